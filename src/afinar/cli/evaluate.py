"""`afinar eval`: base against tuned on held-out data (afinar.pipeline.evaluate_run)."""

from __future__ import annotations

from typing import Optional

import typer

from afinar.cli.common import engine_option, notify, print_report, quiet_libraries
from afinar.console import out, user_errors
from afinar.errors import AfinarError

@user_errors
def eval_(
    model: str = typer.Argument(..., help="A run directory, or any model name/path."),
    data: Optional[str] = typer.Option(None, help="Held-out data (.jsonl); default: a run's "
                                       "own held-out split."),
    baseline: str = typer.Option("auto", help="Model to compare with: auto (a run's base "
                                 "model), none, a model name/path/run, or fewshot[:K] (the "
                                 "base model prompted with K training examples, default 5; "
                                 "report in RUN/eval-fewshotK)."),
    output: Optional[str] = typer.Option(None, help="Report folder (default: the run directory)."),
    checks: Optional[str] = typer.Option(None, help="Checks file (YAML); default: the run's."),
    probes: bool = typer.Option(True, help="Also compare answers to bundled general prompts."),
    max_tokens: Optional[int] = typer.Option(None, help="Longest answer (default: from the "
                                             "references' lengths)."),
    batch_size: int = typer.Option(32, help="Prompts generated together (CPU decoding is "
                                   "bound by reading the weights: bigger batches are cheaper)."),
    cache: bool = typer.Option(True, help="Reuse greedy answers an earlier evaluation "
                               "generated with the same weights, prompt and settings."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    engine: str = engine_option(),
):
    """Measure a model or run on held-out data against its base: loss, answers, checks."""
    quiet_libraries()
    from afinar.console import EvalProgress
    from afinar.pipeline import evaluate_run

    if max_tokens is not None and max_tokens < 1:
        raise AfinarError("--max-tokens must be at least 1")
    report = evaluate_run(model, data=data, baseline=baseline, output=output, checks=checks,
                      probes=probes, max_new_tokens=max_tokens, batch_size=batch_size,
                      use_cache=cache, on_event=EvalProgress(), notify=notify, engine=engine)
    if as_json:
        out.print_json(data=report.summary)
    else:
        print_report(report)
