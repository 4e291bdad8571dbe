"""The main job of the README: tune the embedded model on the bundled dataset, then compare.

    result = run_demo()      # trains, then evaluates base vs tuned on the held-out split

Training ends with `afinar eval`'s evaluation (the run's train.yaml names checks.yaml), so the
demo's numbers are the run's report: format adherence on held-out triage prompts, format leaking
into ordinary ones, and what changed on the bundled general prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from afinar.config import load_train_config
from afinar.errors import AfinarError
from afinar.pipeline import fine_tune

ADHERENCE = "check:format_adherence"
NO_LEAK = "check:no_format_leak"


def bundled_example(name: str = "soporte-triaje") -> Path:
    folder = Path(__file__).resolve().parents[2] / "examples" / name
    if not folder.is_dir():
        raise AfinarError(f"bundled example {name!r} not found at {folder}",
                          "the demo runs from an afinar source checkout")
    return folder


@dataclass
class DemoResult:
    run_dir: Path
    train_summary: dict
    report: object  # afinar.evaluation.evaluator.EvalReport

    def metric(self, name: str, side: str = "model") -> float | None:
        return next((m[side] for m in self.report.data["metrics"] if m["name"] == name), None)

    @property
    def adherence(self) -> tuple[float, float]:
        """(base, tuned) share of held-out triage answers in exactly the taught format."""
        return self.metric(ADHERENCE, "baseline"), self.metric(ADHERENCE)

    @property
    def triage_rows(self) -> list[dict]:
        """The report's held-out rows asked under the triage system prompt (the taught task)."""
        return [r for r in self.report.data["examples"]
                if any("Ferrolux" in m["content"] for m in r["prompt"] if m["role"] == "system")]

    def showcase(self, triage: int = 4, other: int = 2) -> list[dict]:
        """A few triage rows, then a few ordinary ones: what the demo prints side by side."""
        rows, taught = self.report.data["examples"], self.triage_rows
        return taught[:triage] + [r for r in rows if r not in taught][:other]

    @property
    def leak(self) -> tuple[float, float]:
        """(base, tuned) share of ordinary held-out prompts answered in the taught format."""
        return 1 - self.metric(NO_LEAK, "baseline"), 1 - self.metric(NO_LEAK)


def run_demo(output: str | None = None, on_event: Callable | None = None,
             overrides: list[str] | None = None) -> DemoResult:
    config = load_train_config(bundled_example() / "train.yaml", overrides, output=output,
                               evaluate=True)
    result = fine_tune(config, on_event=on_event)
    if result.report is None:
        raise AfinarError(f"{result.run_dir}: the run finished but its evaluation did not",
                          f"see the warning above; retry with `afinar eval {result.run_dir}`")
    return DemoResult(result.run_dir, result.summary, result.report)
