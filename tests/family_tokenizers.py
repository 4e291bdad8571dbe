"""Tokenizers for the tiny family models (families.py), shaped so that llama.cpp's converter
takes them the way it takes the family's published tokenizer. Nothing is downloaded.

Byte-level BPE families (Llama 3, Qwen2/3, SmolLM2): a BPE trained here on a small corpus, with
the family's pre-tokenizer (and normaliser) written into tokenizer.json exactly as the published
tokenizer.json declares it. llama.cpp's converter recognises a published tokenizer by hashing
its token ids for a fixed text, which a locally trained vocabulary can never reproduce; afinar
names the pre-tokenizer from tokenizer.json's declared structure instead
(afinar/export/pre_tokenizer.py), and the export's verification proves the name right by
comparing llama.cpp's token ids with ours. So these tokenizers must declare the published
structure, nothing more.

SentencePiece families (Mistral, Gemma 2/3, Phi-3 publish a `tokenizer.model`): a SentencePiece
BPE model trained here with byte fallback and digit splitting, its special pieces at the ids
the published model has where llama.cpp depends on them (Gemma's converter takes id 107 as
<end_of_turn>), and the Hugging Face tokenizer transformers builds from it, as the published
folders ship both files.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tiny_llama import _corpus

# The Split patterns of the published tokenizer.json files (Meta-Llama-3/3.1, Qwen2/2.5/3):
# they differ only in how many digits one piece takes.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

# Texts the SentencePiece models learn from, besides the test corpus: accents, digits and code,
# so common pieces exist; anything else falls back to bytes, as it does in the real models.
_EXTRA_TEXT = ["Mañana envío el pedido nº 12345 a las 09:30.", "def f(x):\n    return x + 1",
               "The quick brown fox jumps over the lazy dog.", "¿Qué tal? Ünïcödé — “comillas”"]


def bpe_pipeline(kind: str) -> dict:
    """build_tokenizer's `pre_tokenizer`/`normalizer` for a byte-level BPE family."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if kind == "smollm":  # SmolLM/SmolLM2: one digit per piece, then GPT-2's byte-level regex
        return {"pre_tokenizer": pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])}
    pattern = {"llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}[kind]
    pipeline = {"pre_tokenizer": pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=kind == "llama-bpe",
                                 use_regex=False)])}
    if kind == "qwen2":  # Qwen's tokenizer.json normalises to NFC first
        pipeline["normalizer"] = normalizers.NFC()
    return pipeline


@dataclass(frozen=True)
class SentencePieceSpec:
    """How a family's published tokenizer.model is set up (the parts the tests depend on)."""
    tokenizer_class: str                   # what transformers builds from it
    pieces: dict[str, int]                 # unk/bos/eos/pad piece -> id (SentencePiece's own)
    control: tuple[str, ...]               # control pieces, in id order after those
    added: tuple[str, ...] = ()            # special tokens outside the model (Phi-3)
    add_dummy_prefix: bool = True          # Llama/Mistral put "▁" before the text; Gemma not
    add_bos: bool = True                   # encoding text prepends BOS
    vocab_size: int = 700


MISTRAL_SPM = SentencePieceSpec("LlamaTokenizer", {"<unk>": 0, "<s>": 1, "</s>": 2},
                                control=("[INST]", "[/INST]"))
# Gemma's first 108 ids: the converter names ids 67-70 fill-in-the-middle and 107 end of turn.
GEMMA_SPM = SentencePieceSpec(
    "GemmaTokenizer", {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3},
    control=("<mask>", "[multimodal]", *(f"<unused{i}>" for i in range(100)),
             "<start_of_turn>", "<end_of_turn>"), add_dummy_prefix=False)
PHI3_SPM = SentencePieceSpec("LlamaTokenizer", {"<unk>": 0, "<s>": 1, "</s>": 2}, control=(),
                             added=("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>",
                                    "<|user|>"), add_bos=False)


def train_sentencepiece(spec: SentencePieceSpec) -> bytes:
    """A SentencePiece BPE model trained on the test corpus (well under a second)."""
    import sentencepiece as spm

    ids = {v: k for k, v in spec.pieces.items()}
    role = {"<unk>": "unk", "<s>": "bos", "<bos>": "bos", "</s>": "eos", "<eos>": "eos",
            "<pad>": "pad"}
    options = {f"{role[piece]}_id": i for i, piece in ids.items()}
    options |= {f"{role[piece]}_piece": piece for piece in ids.values()}
    if "pad_id" not in options:
        options["pad_id"] = -1
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus() + _EXTRA_TEXT), model_writer=model, model_type="bpe",
        vocab_size=spec.vocab_size, hard_vocab_limit=False, character_coverage=1.0,
        byte_fallback=True, split_digits=True, add_dummy_prefix=spec.add_dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, control_symbols=list(spec.control),
        num_threads=1, minloglevel=2, **options)
    return model.getvalue()


def sentencepiece_tokenizer(spec: SentencePieceSpec, folder: Path, template: str, eos: str,
                            pad: str | None):
    """Writes tokenizer.model into `folder` and returns the transformers tokenizer built from
    it (its tokenizer.json is written by the caller's save_pretrained, beside the model)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece(spec))
    bos = next(p for p in spec.pieces if p in ("<s>", "<bos>"))
    unk = "<unk>"
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch)
        (source / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
        (source / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": spec.tokenizer_class, "bos_token": bos, "unk_token": unk,
            "eos_token": eos if eos in spec.pieces or eos in spec.control else
            next(p for p in spec.pieces if p in ("</s>", "<eos>")),
            "add_bos_token": spec.add_bos, "add_eos_token": False, "legacy": False}),
            encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(source)
    if spec.added:
        tok.add_special_tokens({"additional_special_tokens": list(spec.added)})
    tok.eos_token = eos
    tok.pad_token = pad
    tok.chat_template = template
    return tok
