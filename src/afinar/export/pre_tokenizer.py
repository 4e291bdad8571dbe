"""llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, read from tokenizer.json.

    name = pre_tokenizer_name(Path("merged/tokenizer.json"))   # "llama-bpe", "qwen2", ... or None

llama.cpp does not run the Hugging Face pre-tokenizer: it applies one of its own regex sets,
named by `tokenizer.ggml.pre`. Its converter picks the name by hashing a fixed string's token
ids against a list of published tokenizers, so a tokenizer trained or extended locally (a
domain tokenizer, every tokenizer of afinar's tests) matches none and the converter refuses it,
although its pre-tokenizer is one llama.cpp has. convert.py passes this name to the converter
only for that case: a hash llama.cpp knows always wins. The name comes from the structure of
tokenizer.json (the regex and steps that define the split), never from sample output, and the
export's verification then checks that llama.cpp tokenises prompts and tricky strings to exactly
the ids the model was trained on, so a wrong name fails the export instead of shipping.

This is the one piece kept from afinar's former GGUF writer (gguf_vocab.py), for that reason.
"""

from __future__ import annotations

import json
from pathlib import Path

# Pre-tokenizer regexes as Hugging Face writes them in tokenizer.json (Split patterns), and the
# llama.cpp pre-tokenizer that implements the same split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
# Normalizers llama.cpp's BPE tokenizer leaves out for that pre-tokenizer with published models
# too (Qwen2's NFC), so a converted published model and ours behave alike.
_NORMALIZER_OK = {"qwen2": ("NFC",)}


def _from_steps(pre: dict | None) -> str | None:
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") if step else None for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
            and steps[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def pre_tokenizer_name(tokenizer_json: Path) -> str | None:
    """The llama.cpp pre-tokenizer equivalent to this tokenizer's, or None when there is none
    that afinar knows (or the file is not a byte-level BPE tokenizer: SentencePiece models need
    no name)."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    name = _from_steps(data.get("pre_tokenizer"))
    normalizer = data.get("normalizer")
    if name and normalizer and normalizer.get("type") not in _NORMALIZER_OK.get(name, ()):
        return None  # llama.cpp would skip a normalisation the model was trained with
    return name
