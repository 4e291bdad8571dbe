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
    # Tuned answers stop by themselves: shorter than the generation budget allows.
    assert all(len(r["model"]["answer"]) < 600 for r in triage)

    # The general prompts were answered by both models and compared.
    assert report["regressions"]["summary"]["prompts"] == 24
    assert (run / "report.html").stat().st_size > 10_000
    assert "Format adherence" in done.stdout and "held-out loss" in done.stdout
    with open_registry() as registry:
        assert registry.get(str(run)).metrics["check:format_adherence"] == adherence["model"]
