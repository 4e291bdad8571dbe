"""The tokenizer part of a GGUF file: token list and types, merges, pre-tokenizer, special ids,
chat template. Written from the Hugging Face tokenizer the run trained with.

llama.cpp does not run the Hugging Face pre-tokenizer: it picks one of its own regex sets by the
`tokenizer.ggml.pre` name. We name it from the structure of tokenizer.json (never from a hash of
sample output, which breaks whenever a tokenizer changes), and the export's verification then
checks that llama.cpp tokenises prompts and tricky strings to exactly the ids we trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from afinar.errors import AfinarError

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes as Hugging Face writes them in tokenizer.json (Split patterns), and the
# llama.cpp pre-tokenizer that implements the same split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GgufVocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer described by tokenizer.json."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if s else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PRE:
            return _SPLIT_PRE[pattern]
    raise AfinarError(
        f"this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) has no llama.cpp equivalent "
        "that afinar knows",
        "export --to merged works for any tokenizer; GGUF needs a byte-level BPE tokenizer of the "
        "GPT-2, SmolLM, Llama-3 or Qwen2 kind")


def _merges(model: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings (old) or [a, b] pairs (new); GGUF wants "a b".
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def adds_special(tokenizer, token_id: int | None) -> bool:
    """Does encoding plain text (with special tokens on) put this token in? (BOS/EOS flags)."""
    if token_id is None:
        return False
    return token_id in tokenizer("a", add_special_tokens=True)["input_ids"] \
        and token_id not in tokenizer("a", add_special_tokens=False)["input_ids"]


def build_vocab(tokenizer, vocab_size: int, stop_ids: list[int]) -> GgufVocab:
    """`vocab_size` is the model's embedding rows; ids the tokenizer lacks become UNUSED pads."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise AfinarError(
            f"GGUF export supports byte-level BPE tokenizers; this one is "
            f"{model.get('type')}{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}",
            "export --to merged works for any tokenizer")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    if data.get("normalizer"):
        raise AfinarError(f"this tokenizer has a normalizer ({data['normalizer'].get('type')}) "
                          "that llama.cpp's BPE tokenizer does not apply",
                          "export --to merged works for any tokenizer")

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    if max(by_id) >= vocab_size:
        raise AfinarError(f"the tokenizer has ids up to {max(by_id)} but the model only "
                          f"{vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(by_id[i])
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            types.append(NORMAL)

    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
               "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id}
    # A template that ends turns with a token other than EOS (e.g. Llama-3's <|eot_id|>) must
    # stop llama.cpp too: that token is the end-of-turn id.
    eot = [i for i in stop_ids if i != tokenizer.eos_token_id]
    if eot:
        special["eot"] = eot[0]
    return GgufVocab(
        model="gpt2", pre=pre, tokens=tokens, types=types, merges=_merges(model),
        special_ids={k: v for k, v in special.items() if v is not None},
        add_bos=adds_special(tokenizer, tokenizer.bos_token_id),
        add_eos=adds_special(tokenizer, tokenizer.eos_token_id),
        chat_template=tokenizer.chat_template)


def write_vocab(writer, vocab: GgufVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id,
              "eot": writer.add_eot_token_id}
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
