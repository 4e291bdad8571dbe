"""The README's main job on the real embedded model: held-out format adherence must rise well
above the base model's, as the run's own evaluation report says and as the answers show. A few
dozen LoRA steps on CPU, then base vs tuned generation (several minutes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from afinar.versions import open_registry

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "soporte-triaje"


def _metric(report: dict, name: str) -> dict:
    return next(m for m in report["metrics"] if m["name"] == name)


def test_demo_teaches_the_format_and_the_report_says_so(demo_run):
    run, done = demo_run
    report = json.loads((run / "report.json").read_text())
    adherence = _metric(report, "check:format_adherence")
    no_leak = _metric(report, "check:no_format_leak")
    print(json.dumps({"metrics": report["metrics"], "timing": report["timing"],
                      "regressions": report["regressions"]["summary"]}, indent=1))
    assert adherence["n"] >= 15
    assert adherence["baseline"] <= 0.2
    assert adherence["model"] >= 0.8  # measured 18/19 (95%)
    assert adherence["model"] >= adherence["baseline"] + 0.6
    # Most ordinary prompts keep ordinary answers (measured 6/17 leak; a 135M model confuses some
    # Spanish questions with tickets).
    assert no_leak["model"] >= 0.5
    assert _metric(report, "eval_loss")["model"] < 3.0  # base held-out loss is about 3.5

    # What a person sees reading the answers is what the report counts: apply the format regex
    # to the answers ourselves.
    fmt = yaml.safe_load((EXAMPLE / "checks.yaml").read_text(encoding="utf-8"))["checks"][0]
    triage = [r for r in report["examples"]
              if any("Ferrolux" in m["content"] for m in r["prompt"] if m["role"] == "system")]
    for side in ("model", "baseline"):
        seen = sum(bool(re.fullmatch(fmt["regex"], r[side]["answer"].strip())) for r in triage)
        assert seen / len(triage) == pytest.approx(adherence[side]), side
    # Most tuned answers stop by themselves, well short of the generation budget (173 tokens,
    # 450-600 characters of Spanish). A 135M model loops a phrase to the budget on a few: 3 of
    # 19 here (avx512_bf16), their lengths 454-587 characters; one such loop ran past 600 on an
    # earlier run, so the test counts the answers that stopped instead of bounding the longest.
    stopped = sum(len(r["model"]["answer"]) < 400 for r in triage)
    assert stopped >= 0.75 * len(triage), [len(r["model"]["answer"]) for r in triage]

    # The general prompts were answered by both models and compared.
    assert report["regressions"]["summary"]["prompts"] == 24
    assert (run / "report.html").stat().st_size > 10_000
    assert "Format adherence" in done.stdout and "held-out loss" in done.stdout
    with open_registry() as registry:
        assert registry.get(str(run)).metrics["check:format_adherence"] == adherence["model"]


def test_the_reports_answers_come_again_from_a_fresh_engine(demo_run):
    # Evaluation answers on llama.cpp repeat run after run: afinar queues a call's prompts in
    # one request, so which share a batch does not depend on timing (llama.cpp's slots are not
    # batch-invariant; one request per prompt changed 4-6 of these 36 answers between runs).
    # The held-out answers are the evaluation's first call on its server: a fresh server given
    # the same call answers exactly as the report says.
    from afinar.engines import open_model
    from afinar.infer.generate import GenerationSettings

    run, _ = demo_run
    report = json.loads((run / "report.json").read_text())
    assert report["engine"]["model"]["engine"] == "llama.cpp"
    model = open_model(str(run), "llamacpp", notify=lambda message: None)
    try:
        settings = GenerationSettings(max_new_tokens=report["generation"]["max_new_tokens"])
        again = model.generate([r["prompt"] for r in report["examples"]], settings)
    finally:
        model.close()
    assert again == [r["model"]["answer"] for r in report["examples"]]
