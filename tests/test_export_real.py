"""The embedded model tuned on the bundled example (the README's demo run, shared with
test_real_model.py), exported to GGUF f16 and q8_0 and run by real llama.cpp: it answers held-out
triage prompts in the taught format and stops by itself, and the verification report says so."""

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


def _triage_prompts(run: Path) -> list[list[dict]]:
    prompts, _ = golden_prompts(run, limit=1000)
    return [p for p in prompts if "Ferrolux" in p[0]["content"]][:8]


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gguf_of_the_demo_run_answers_in_format_and_stops(demo_run, tmp_path, kind):
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
    assert summary["stopped_by_itself"] >= 7

    # As a user of llama.cpp sees it: its chat API, the GGUF's own template and stop tokens.
    triage = _triage_prompts(run)
    assert len(triage) >= 5
    gguf_file = result.output / f"{run.name}-{kind}.gguf"
    with LlamaCpp(gguf_file) as llm:
        answers = [llm.chat(p, max_tokens=200) for p in triage]
    for text, finish in answers:
        print(finish, repr(text))
    in_format = sum(bool(re.fullmatch(FORMAT["regex"], text.strip())) for text, _ in answers)
    # The template's stop token is honoured: none is printed as text, and the answers end by
    # themselves, as many as the export's own verification requires (all but one). Which one
    # may loop to its limit depends on the CPU: on an AVX512-BF16 EPYC (2026-12-05) the demo
    # trains in bf16 and one q8_0 answer of 8 repeats a sentence at a near-tie; an fp32-only
    # Zen 3 and the AMX Xeon measured 8 of 8.
    assert not any(marker in text for text, _ in answers
                   for marker in ("<|im_end|>", "<|im_start|>"))
    assert sum(finish == "stop" for _, finish in answers) >= len(answers) - 1
    assert in_format >= len(answers) - 1  # measured: all of them (the run's own report: 18/19)


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
