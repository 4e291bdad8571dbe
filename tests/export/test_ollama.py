"""Ollama Modelfile export: the TEMPLATE must reproduce the training chat format exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import build_tokenizer

from afinar.errors import AfinarError
from afinar.export.ollama import (TemplatePieces, create_command, go_template, modelfile, render,
                                  template_pieces, valid_model_name)


LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
ZEPHYR = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content']"
    " + '</s>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
NUMBERED = (
    "{% for message in messages %}{{ 'Turn ' ~ loop.index ~ ' ' + message['role'] + ': '"
    " + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
UPPERCASE = ZEPHYR.replace("message['content']", "message['content'] | upper")
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Like Llama 3.1: a system block is always written, empty when there is no system message; the
# TEMPLATE writes it without `{{ if .System }}`.
ALWAYS_SYSTEM_BLOCK = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|system|>\n' + sys + '</s>\n' }}{% for message in rest %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
# Literal braces (Go action delimiters) and a quote right before the closing """.
BRACES = (
    "{% for message in messages %}{{ '{{' + message['role'] + '}} {\"' + message['content']"
    " + '\"}\n' }}{% endfor %}{% if add_generation_prompt %}{{ '{{assistant}} {\"' }}{% endif %}")

CHATML_PIECES = TemplatePieces(
    always_prefix="", system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
    user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n", default_system="You are a test model.")

CHATML_MODELFILE = '''# Written by afinar from run soporte.
# TEMPLATE, stop strings and SYSTEM reproduce the chat format it was trained with.
FROM ./soporte.Q8_0.gguf

TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER stop "<|endoftext|>"
SYSTEM """You are a test model."""
'''


def _conversations() -> list[list[dict]]:
    """Conversations beyond the module's own checks: other texts, lengths and system prompts."""
    texts = ["¿Dónde está mi pedido 1234?", "Categoría: envío\nPrioridad: alta", "ok",
             "line one\n\nline two", "símbolos: {{ }} <tags> \"quotes\" 'single'", "último"]
    systems = [None, "Eres el asistente de Ferrolux.", "Multi\nline system"]
    convs = []
    for system in systems:
        for n in range(1, 7):
            conv = [{"role": "user" if i % 2 == 0 else "assistant", "content": texts[i]}
                    for i in range(n)]
            convs.append(([{"role": "system", "content": system}] if system else []) + conv)
    return convs


def _same_as_jinja(tokenizer, pieces: TemplatePieces) -> None:
    for conv in _conversations():
        for generation in (True, False):
            expected = tokenizer.apply_chat_template(conv, tokenize=False,
                                                     add_generation_prompt=generation)
            assert render(pieces, conv, system=pieces.default_system,
                          add_generation_prompt=generation) == expected


def test_chatml_pieces_and_default_system():
    tok = build_tokenizer()
    pieces = template_pieces(tok)
    assert pieces == CHATML_PIECES
    assert pieces.default_system == "You are a test model."
    _same_as_jinja(tok, pieces)


def test_llama3_style_always_prefix_and_no_default_system():
    tok = build_tokenizer(LLAMA3)
    pieces = template_pieces(tok)
    assert pieces.always_prefix == "<|begin_of_text|>"
    assert pieces.default_system is None
    assert pieces.system_prefix == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert pieces.user_prefix == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert pieces.user_suffix == pieces.assistant_suffix == pieces.system_suffix == "<|eot_id|>"
    assert pieces.generation_prompt == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    _same_as_jinja(tok, pieces)
    assert go_template(pieces).startswith("<|begin_of_text|>{{ if .System }}")
    # When the GGUF adds BOS itself, the TEMPLATE must not write a second one.
    assert go_template(pieces, include_always_prefix=False).startswith("{{ if .System }}")


def test_default_system_after_a_bos_keeps_the_bos_outside_the_system_block():
    template = LLAMA3.replace(
        "{% for message in messages %}",
        "{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>"
        "\n\nBe brief.<|eot_id|>' }}{% endif %}{% for message in messages %}")
    tok = build_tokenizer(template, bos="<s>")
    pieces = template_pieces(tok)
    assert pieces.default_system == "Be brief."
    assert pieces.always_prefix == ""  # "<s>" is not at the start: nothing to keep outside
    _same_as_jinja(tok, pieces)
    tok = build_tokenizer(template.replace("<|begin_of_text|>", "<s>"), bos="<s>")
    pieces = template_pieces(tok)
    assert (pieces.always_prefix, pieces.default_system) == ("<s>", "Be brief.")
    _same_as_jinja(tok, pieces)


def test_zephyr_style():
    tok = build_tokenizer(ZEPHYR)
    pieces = template_pieces(tok)
    assert pieces == TemplatePieces("", "<|system|>\n", "</s>\n", "<|user|>\n", "</s>\n",
                                    "<|assistant|>\n", "</s>\n", "<|assistant|>\n", None)
    _same_as_jinja(tok, pieces)


def test_a_system_block_written_even_without_a_system_message():
    tok = build_tokenizer(ALWAYS_SYSTEM_BLOCK)
    pieces = template_pieces(tok)
    assert (pieces.system_mode, pieces.default_system) == ("own_always", None)
    assert (pieces.system_prefix, pieces.system_suffix) == ("<|system|>\n", "</s>\n")
    _same_as_jinja(tok, pieces)
    assert go_template(pieces).startswith("<|system|>\n{{ .System }}</s>\n{{ range .Messages }}")


@pytest.mark.parametrize("template, says", [
    (NUMBERED, "writes"),  # turn numbers: right for one prompt, wrong for a longer one
    (UPPERCASE, "writes"),
    (NO_SYSTEM, "System role not supported"),
])
def test_inexpressible_templates_are_refused_clearly(template, says):
    with pytest.raises(AfinarError) as info:
        template_pieces(build_tokenizer(template))
    err = info.value
    assert "cannot express this chat template as an Ollama TEMPLATE" in err.message
    assert says in err.message
    assert err.hint and "by hand" in err.hint
    # No chained jinja traceback: the CLI prints the message and hint only.
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_render_mirrors_ollama_system_handling():
    conv = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    # SYSTEM applies only when the request has no system message; same roles are merged.
    assert render(CHATML_PIECES, conv, system="S", add_generation_prompt=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na\n\nb<|im_end|>\n")
    own = [{"role": "system", "content": "mine"}] + conv[:1]
    assert render(CHATML_PIECES, own, system="S") == (
        "<|im_start|>system\nmine<|im_end|>\n<|im_start|>user\na<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_chatml_modelfile_exactly():
    text = modelfile("soporte.Q8_0.gguf", template_pieces(build_tokenizer()),
                     ["<|im_end|>", "<|endoftext|>", "<|im_end|>"], None, run="soporte")
    assert text == CHATML_MODELFILE
    one = modelfile("m.gguf", CHATML_PIECES, ["<|im_end|>"], "Eres Ferrolux.",
                    {"num_ctx": 4096, "temperature": 0.2})
    assert one.count("PARAMETER stop") == 1
    assert 'PARAMETER num_ctx 4096\nPARAMETER temperature 0.2\nSYSTEM """Eres Ferrolux."""' in one
    assert "temperature" not in CHATML_MODELFILE  # no sampling parameters unless asked


def test_braces_in_literal_text_are_escaped_the_go_way():
    pieces = TemplatePieces("", "", "", "{{user}}{", ": ", "", "\n", "", None)
    text = go_template(pieces)
    assert '{{ "{" }}{{ "{" }}user}}{{ "{" }}{{ .Content }}' in text
    # Braces and quotes in a real template's pieces: derived, verified, and written.
    tok = build_tokenizer(BRACES)
    pieces = template_pieces(tok)
    assert pieces.user_prefix == '{{user}} {"' and pieces.generation_prompt.endswith('"')
    _same_as_jinja(tok, pieces)
    assert '{{ "{" }}{{ "{" }}assistant}} {{ "{" }}""""' in modelfile("m.gguf", pieces, [], None)


@pytest.mark.parametrize("call, says", [
    (lambda: modelfile("m.gguf", CHATML_PIECES, [], 'say """hi"""'), '"""'),
    (lambda: modelfile("m.gguf", CHATML_PIECES, [], "zero\u200bwidth"), "cannot carry"),
    (lambda: modelfile("m.gguf", CHATML_PIECES, ['a"b'], None), "stop string"),
    (lambda: modelfile("m.gguf", CHATML_PIECES, [""], None), "stop string"),
    (lambda: modelfile("../m.gguf", CHATML_PIECES, [], None), "plain file name"),
    (lambda: modelfile("m.gguf", CHATML_PIECES, [], None, {"Bad Key": 1}), "parameter name"),
    (lambda: modelfile("m.gguf", TemplatePieces('"""', "", "", "", "", "", "", "", None), [],
                       None), '"""'),
])
def test_modelfile_refuses_what_it_cannot_write(call, says):
    with pytest.raises(AfinarError) as info:
        call()
    assert says in info.value.message


def test_create_command_quotes_paths_and_names():
    assert create_command(Path("/tmp/my runs/soporte"), "afinar-soporte") == (
        "cd '/tmp/my runs/soporte' && ollama create afinar-soporte -f Modelfile")


@pytest.mark.parametrize("name, expected", [
    ("soporte", "afinar-soporte"), ("Soporte Triaje", "afinar-soporte-triaje"),
    ("afinar-soporte", "afinar-soporte"), ("Categoría..v2/run", "afinar-categoria.v2-run"),
    ("--", "afinar"), ("x" * 200, "afinar-" + "x" * 73),
])
def test_valid_model_name(name, expected):
    assert valid_model_name(name) == expected
    assert valid_model_name("Mi Modelo", prefix="") == "mi-modelo"


@pytest.mark.real_model
def test_real_smollm2_template():
    from transformers import AutoTokenizer

    from afinar.models.registry import DEFAULT_MODEL, resolve_model

    # Converts the embedded model once if this session has not yet (about 30 s; then cached).
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL, notify=print).tokenizer_source)
    pieces = template_pieces(tok)
    assert pieces.default_system == ("You are a helpful AI assistant named SmolLM, "
                                     "trained by Hugging Face")
    assert pieces.always_prefix == ""  # its bos_token is <|im_start|>, which opens every turn
    assert pieces == TemplatePieces(**{**vars(CHATML_PIECES),
                                       "default_system": pieces.default_system})
    _same_as_jinja(tok, pieces)
    # The TEMPLATE itself, in Go's text/template, with the default SYSTEM Ollama would add.
    from ollama_template.go_render import ollama_values, render_with_go

    conversations = [c for c in _conversations() if c[-1]["role"] == "user"]
    rendered = render_with_go(go_template(pieces), [ollama_values(c, pieces.default_system)
                                                    for c in conversations])
    assert rendered == [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                        for c in conversations]
