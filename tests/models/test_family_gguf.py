"""Every family's tiny model, trained a few LoRA steps, exports through llama.cpp's converter to
f16, q8_0 and q4_k_m GGUF, to a GGUF LoRA adapter and to an Ollama folder, and each passes
afinar's verification: the answers, llama.cpp's tokenizer on the probe strings and the file's
own chat template on the probe conversations. The Ollama TEMPLATE written is rendered with Go.

Nothing is skipped: a family the export cannot yet give users is asserted to fail, with the
reason (see NOT_YET), so that the day it passes this test says so.

Measured here (2 cores, llama.cpp 0c1e57098): about 30-60 s per family.
"""

from __future__ import annotations

import re

import pytest
from ollama_template.go_render import ollama_values, render_with_go

from afinar.errors import AfinarError
from afinar.export import export
from afinar.export.verify import VerificationFailed
from families import FAMILIES, GGUF_VARIANTS
from family_fixtures import _one_thread, family_dir, family_run  # noqa: F401 (fixtures)

NAMES = [GGUF_VARIANTS[n].name if n in GGUF_VARIANTS else n for n in FAMILIES]
KINDS = ("f16", "q8_0", "q4_k_m")
# Nothing is refused today. A family listed here (name -> what verification says) is asserted to
# fail, with the reason, so that the day it passes this test says so.
NOT_YET: dict[str, str] = {}
# Tokenizers that put "▁" before text only at the start of the input (transformers 5's Llama-style
# SentencePiece tokenizers): their files say add_space_prefix=false and their probes are checked
# after BOS, which the report says (afinar/export/space_prefix.py). Everyone else: alone.
PROBES_AFTER = {"mistral-v0.3": "<s>", "phi3": "<s>"}


def _export(run, to: str, kind: str, out):
    result = export(str(run), to=to, quant=kind, output=str(out), prompts=2, max_new_tokens=12,
                    exact_tokens=12, notify=lambda message: None)
    summary = result.verification.summary()
    assert summary["passed"], result.verification.lines()
    assert summary["same_prompt_ids"] == summary["prompts"]
    assert summary["tokenizer_probes_mismatched"] == 0
    assert summary["chat_template_probes_mismatched"] == 0
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_gguf_types_adapter_and_ollama_verify(name, family_run, tmp_path):
    run = family_run(name)
    if name in NOT_YET:
        with pytest.raises(VerificationFailed, match=NOT_YET[name]) as failed:
            _export(run, "gguf", "f16", tmp_path / "gguf-f16")
        assert "chat template gives other prompt ids" in str(failed.value)
        assert not (tmp_path / "gguf-f16").exists()
        return
    for kind in KINDS:
        result = _export(run, "gguf", kind, tmp_path / f"gguf-{kind}")
        assert any(f.endswith(f"-{kind}.gguf") for f in result.files)
        assert result.verification.summary()["tokenizer_probes_after"] == PROBES_AFTER.get(name)
    _export(run, "gguf-adapter", "f32", tmp_path / "adapter")
    result = _export(run, "ollama", "q8_0", tmp_path / "ollama")
    modelfile = (result.output / "Modelfile").read_text(encoding="utf-8")
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    conversation = [{"role": "user", "content": "pedido 99 llegó roto"}]
    import afinar

    loaded = afinar.load(str(run), notify=lambda message: None)
    [got] = render_with_go(template, [ollama_values(conversation, system and system.group(1))])
    expected = loaded.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                    add_generation_prompt=True)
    assert expected.endswith(got) and expected[:len(expected) - len(got)] in (
        "", loaded.tokenizer.bos_token), FAMILIES[name].name


@pytest.mark.slow
def test_a_window_llama_cpp_would_not_apply_is_refused_before_converting(family_run, tmp_path):
    with pytest.raises(AfinarError, match="sliding-window") as refused:
        export(str(family_run("mistral")), to="gguf", output=str(tmp_path / "gguf"),
               notify=lambda message: None)
    assert "--to merged" in str(refused.value) and not (tmp_path / "gguf").exists()
