"""Where a SentencePiece-style tokenizer puts the "▁" before text, and the one llama.cpp setting
that reproduces it inside a chat prompt.

    space_prefix_only_at_start(json.loads(Path("merged/tokenizer.json").read_text()))  # bool

transformers 5 builds the Llama/Mistral/Phi-3 tokenizer (`legacy=False`, the default) with a
Metaspace pre-tokenizer whose `prepend_scheme` is "first": "▁" goes before the text only at the
very start of the input, never after a special token ("[INST] hola" -> [INST] ▁hola,
"<|user|>\\nhola" -> <|user|> \\n hola). llama.cpp's SentencePiece tokenizer knows two rules
(`tokenizer.ggml.add_space_prefix`): on, "▁" at the start *and after every special token*
([INST] ▁ ▁hola, <|user|> ▁ \\n ...); off, never. Neither is "first". Measured on the tiny
Mistral v0.3 and Phi-3 models (tests/families.py) against afinar's probe conversations: on,
0/4 chat prompts keep the trained ids; off, 4/4. A chat prompt always starts with a control
token (BOS, [INST], <|user|>), so with the rule off every piece of text in it is tokenised as in
training; only raw text at the very start of a template-less prompt loses its leading "▁". The
export writes the rule off for such tokenizers, and its verification checks the tokenizer probes
where text sits in a prompt: after a control token (verify.llama_checks says so in the report).
"""

from __future__ import annotations

# The GGUF key llama.cpp reads (llama-vocab.cpp, LLM_KV_TOKENIZER_ADD_PREFIX).
ADD_SPACE_PREFIX_KEY = "tokenizer.ggml.add_space_prefix"


def space_prefix_only_at_start(tokenizer_json: dict) -> bool:
    """Does this tokenizer.json put "▁" before the text only at the start of the input?"""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(step and step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first"
               for step in steps)


def gguf_overrides(tokenizer_json: dict) -> dict[str, bool]:
    """Typed GGUF keys the converter's own choice must give way to, for this tokenizer."""
    return {ADD_SPACE_PREFIX_KEY: False} if space_prefix_only_at_start(tokenizer_json) else {}
