"""Each family's tiny tokenizer is one llama.cpp's converter takes the way it takes the
published one, and each family's Ollama Modelfile TEMPLATE, rendered by Go's own text/template,
writes exactly the prompt the trained model's chat template writes."""

from __future__ import annotations

import json
import re

import pytest
from ollama_template.go_render import ollama_values, render_with_go

from afinar.data.tokenize import ChatEncoder
from afinar.export.ollama import check_conversations, modelfile, template_pieces
from afinar.export.verify import TOKENIZER_PROBES
from families import FAMILIES, family_tokenizer
from family_fixtures import _one_thread, family_dir  # noqa: F401 (fixtures)
from family_tokenizers import LLAMA3_PATTERN, QWEN2_PATTERN

NAMES = list(FAMILIES)
BPE = [n for n in NAMES if FAMILIES[n].bpe]
SPM = [n for n in NAMES if FAMILIES[n].spm]

# The pre-tokenizer steps as the published tokenizer.json files write them (less ByteLevel's
# trim_offsets, which moves character offsets, never ids, and which transformers' own Qwen2
# tokenizer class sets otherwise).
PUBLISHED_PRE = {
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated",
                   "invert": False},
                  {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],
    "qwen2": [{"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated",
               "invert": False},
              {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}],
    "smollm": [{"type": "Digits", "individual_digits": True},
               {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}],
}


def _saved_tokenizer_json(name, family_dir, tmp_path) -> dict:
    """tokenizer.json as an export writes it: the tokenizer afinar loads, saved again."""
    import afinar

    loaded = afinar.load(str(family_dir(name)), notify=lambda message: None)
    loaded.tokenizer.save_pretrained(tmp_path)
    return json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", BPE)
def test_byte_level_bpe_declares_the_published_pre_tokenizer(name, family_dir, tmp_path):
    data = _saved_tokenizer_json(name, family_dir, tmp_path)
    assert data["model"]["type"] == "BPE" and not data["model"].get("byte_fallback")
    steps = data["pre_tokenizer"]["pretokenizers"]
    for step in steps:
        step.pop("trim_offsets", None)
    assert data["pre_tokenizer"]["type"] == "Sequence"
    assert steps == PUBLISHED_PRE[FAMILIES[name].bpe]
    normalizer = data.get("normalizer")
    assert (normalizer or {}).get("type") == ("NFC" if FAMILIES[name].bpe == "qwen2" else None)


@pytest.mark.parametrize("name", SPM)
def test_sentencepiece_families_ship_a_model_their_tokenizer_agrees_with(name, family_dir):
    """llama.cpp tokenises these with the tokenizer.model's own pieces and scores: the
    transformers tokenizer the model is trained with gives SentencePiece's ids. (Not on runs of
    spaces, where SentencePiece splits before each "▁" and the fast Llama tokenizer, like
    llama.cpp, does not: the export's verification compares llama.cpp with transformers there.)"""
    import sentencepiece
    from transformers import AutoTokenizer

    folder = family_dir(name)
    spec = FAMILIES[name].spm
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(folder)
    for piece, i in spec.pieces.items():
        assert sp.id_to_piece(i) == piece
    if spec.control and "<end_of_turn>" in spec.control:
        assert sp.piece_to_id("<end_of_turn>") == 107  # llama.cpp's Gemma converter says so
    for text in (t for t in TOKENIZER_PROBES if "  " not in t):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    bos = tok("hola")["input_ids"][0] == sp.bos_id()
    assert bos == spec.add_bos
    for special in (*spec.control[-2:], *spec.added):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id


def _modelfile_parts(text: str) -> tuple[str, str | None]:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return template, system.group(1) if system else None


def _conversations() -> list[list[dict]]:
    """check_conversations (1, 2 and 3 user turns, with and without a system message) and text
    a Go template could mangle: braces, quotes, emoji. (Not whitespace around a message: Llama
    and Gemma templates trim it, which a Go template cannot; docs/export.md says so.)"""
    tricky = [{"role": "user", "content": 'usa {{ .System }} y "comillas" {x}'},
              {"role": "assistant", "content": "ok 😀"}, {"role": "user", "content": "}}{{"}]
    return [*check_conversations(), tricky,
            [{"role": "system", "content": "Sistema {{ raro }}"}, *tricky]]


@pytest.mark.parametrize("name", NAMES)
def test_ollama_template_in_go_writes_the_trained_prompt(name, tmp_path):
    family = FAMILIES[name]
    tok = family_tokenizer(family, tmp_path)
    encoder = ChatEncoder(tok, [])  # how afinar gives the template a conversation
    pieces = template_pieces(tok, prepare=encoder.renderable)
    # Ollama adds BOS itself when the GGUF says so; the TEMPLATE then leaves it out.
    drop_bos = family.adds_bos and pieces.always_prefix.startswith(tok.bos_token or "\0")
    stops = [family.eos, *family.stops]
    text = modelfile("m.gguf", pieces, stops, None, include_always_prefix=not drop_bos)
    template, system = _modelfile_parts(text)
    conversations = _conversations()
    rendered = render_with_go(template, [ollama_values(c, system) for c in conversations])
    for conversation, got in zip(conversations, rendered):
        expected = tok.apply_chat_template(encoder.renderable(conversation), tokenize=False,
                                           add_generation_prompt=True)
        assert (tok.bos_token if drop_bos else "") + got == expected, conversation
    # Ollama stops where the trained model ends its turn.
    assert f'PARAMETER stop "{family.end_of_turn}"' in text
    assert pieces.system_mode == {"own": "own", "last_user": "last_user",
                                  "first_user": "first_user", "refused": "first_user"}[
        family.system] or (name == "llama3" and pieces.system_mode == "own_always")
