"""The embedded model tuned on the bundled example (the README's demo run, shared with
test_real_model.py), exported to GGUF f16 and q8_0 and run by real llama.cpp: it answers held-out
prompts as the trained model does (the taught format, stopping where it stops), and the
verification report says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from afinar.export import export
from afinar.export.llama_runner import LlamaCpp
from afinar.export.verify import golden_prompts

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "soporte-triaje"
FORMAT = yaml.safe_load((EXAMPLE / "checks.yaml").read_text(encoding="utf-8"))["checks"][0]


MAX_NEW_TOKENS = 128  # export()'s default, for the verification's answers


def _in_format(text: str) -> bool:
    return bool(re.fullmatch(FORMAT["regex"], text.strip()))


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_of_the_demo_run_answers_in_format_and_stops(demo_run, tmp_path, kind):
    """The GGUF answers as the trained model does, and stops where it stops.

    Held to what holds on every CPU kind, as the export's own verification is: which held-out
    answers the 135M demo model ends by itself within 128 tokens depends on its training's
    near-ties, and those differ by CPU (the demo trains in bf16 where bf16 measures faster) and
    by build (measured on an AVX512-BF16 EPYC, 2026-12-05: the trained model itself ran on to the
    limit on 2 of the 8 prompts, and its f16 file did exactly the same). So the export is
    compared with the trained model, prompt by prompt, never with a fixed count."""
    run, _ = demo_run
    result = export(str(run), to="gguf", quant=kind, output=str(tmp_path / kind), prompts=8)
    summary = result.verification.summary()
    print(json.dumps({"type": kind, "seconds": round(result.seconds, 1), "files": result.files,
                      "verification": summary}, indent=1))
    assert summary["passed"] and summary["prompts"] == 8
    assert summary["same_prompt_ids"] == 8 and summary["tokenizer_probes_mismatched"] == 0
    if kind == "f16":  # measured: 8/8 exact (a near-tie may legitimately part one)
        assert summary["exact_first_tokens"] + summary["parted_at_near_tie"] == 8
        assert summary["exact_first_tokens"] >= 7
    answers = result.verification.prompts
    reference_stopped = [p.reference_tokens < MAX_NEW_TOKENS for p in answers]
    assert sum(reference_stopped) >= 4  # the trained model ends most answers by itself
    for p, stopped in zip(answers, reference_stopped):
        if p.identical:  # the same tokens: it must stop (or not) exactly where the model does
            assert p.export_stopped == stopped, p.prompt
    if kind == "f16":
        assert sum(p.identical for p in answers) >= 7
    # A quantised file's greedy answers part from the model's (its verification judges the
    # teacher-forced agreement), and a parted answer may run on where the model's stopped
    # (measured, q8_0 on the EPYC: identical on 4 of 8, 5 of 8 stopped against the model's 7).
    # A file without working stop tokens would stop none.
    assert summary["stopped_by_itself"] >= len(answers) // 2

    # As a user of llama.cpp sees it: its chat API, with the GGUF's own template and stop
    # tokens, on the same prompts, gives the answers the verification got from token ids.
    golden, _ = golden_prompts(run, limit=8)
    gguf_file = result.output / f"{run.name}-{kind}.gguf"
    with LlamaCpp(gguf_file) as llm:
        chats = [llm.chat(p, max_tokens=MAX_NEW_TOKENS) for p in golden]
    for (text, finish), p in zip(chats, answers):
        print(finish, repr(text))
        assert not any(marker in text for marker in ("<|im_end|>", "<|im_start|>"))
    same = [text.strip() == p.export.strip() for (text, _), p in zip(chats, answers)]
    assert sum(same) >= len(answers) - (kind != "f16")
    for (text, finish), p, equal in zip(chats, answers, same):
        if equal:
            assert (finish == "stop") == p.export_stopped, p.prompt
    # The taught format, where the trained model answers in it.
    triage = [i for i, p in enumerate(golden) if "Ferrolux" in p[0]["content"]]
    assert len(triage) >= 3
    model_in_format = sum(_in_format(answers[i].reference) for i in triage)
    chat_in_format = sum(_in_format(chats[i][0]) for i in triage)
    assert model_in_format >= len(triage) - 1  # measured: all of them
    assert chat_in_format >= model_in_format - (kind != "f16")


def test_ollama_folder_of_the_demo_run(demo_run, tmp_path):
    run, _ = demo_run
    result = export(str(run), to="ollama", quant="q8_0", output=str(tmp_path / "ollama"),
                    prompts=4)
    assert result.verification.passed
    modelfile = (result.output / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    # SmolLM2's template injects its default system prompt; the Modelfile must do the same.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' \
        in modelfile
    assert result.command.endswith("-f Modelfile")
