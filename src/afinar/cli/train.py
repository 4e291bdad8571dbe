"""`afinar train` and `afinar demo`: the fine-tuning pipeline (afinar.pipeline), with progress."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import List, Optional

import typer

from afinar.cli.common import (config_help, parse_int, print_report, print_summary,
                               quiet_libraries)
from afinar.console import TrainProgress, out, user_errors
from afinar.errors import AfinarError
from afinar.models.registry import DEFAULT_MODEL

@user_errors
def train(
    data: Optional[str] = typer.Option(None, help=config_help("data")),
    model: Optional[str] = typer.Option(None, help=config_help("model") +
                                        f" Default {DEFAULT_MODEL}."),
    output: Optional[str] = typer.Option(None, help=config_help("output")),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config file."),
    set_: List[str] = typer.Option([], "--set", help="Override a setting: key=value, e.g. "
                                   "lora.r=8 (repeatable)."),
    validation_data: Optional[str] = typer.Option(None, help=config_help("validation_data")),
    method: Optional[str] = typer.Option(None, help="What to optimise: sft (default), dpo or "
                                         "orpo (preference pairs; the `objective` setting), or "
                                         "which weights train: lora (default) or full."),
    epochs: Optional[str] = typer.Option(None, help=config_help("epochs")),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run directory."),
    checks: Optional[str] = typer.Option(None, help=config_help("checks")),
    evaluate: Optional[bool] = typer.Option(None, "--eval/--no-eval",
                                            help=config_help("evaluate", "(default on) ")),
    tune: Optional[bool] = typer.Option(None, "--tune/--no-tune",
                                        help=config_help("tune", "(default off) ")),
):
    """Fine-tune a model (LoRA by default), evaluate it against its base, write a run directory."""
    from afinar.config import load_train_config, method_option

    quiet_libraries()
    from afinar.pipeline import fine_tune as run_training

    if resume is not None:
        from afinar import rundir

        cfg_file = resume / rundir.CONFIG_FILE
        if not cfg_file.is_file():
            raise AfinarError(f"{resume}: not a run directory (no {rundir.CONFIG_FILE})")
        cfg = load_train_config(cfg_file, set_, anchor_paths=False)
        cfg = cfg.model_copy(update={"output": str(resume), **(
            {"evaluate": evaluate} if evaluate is not None else {})})
    else:
        values = {"data": data, "model": model, "output": output,
                  "validation_data": validation_data, "checks": checks, "evaluate": evaluate,
                  "tune": tune, **method_option(method),
                  "epochs": (epochs if epochs in (None, "auto") else parse_int(epochs, "--epochs"))}
        cfg = load_train_config(config, set_, **values)
    progress = TrainProgress()
    result = run_training(cfg, on_event=progress, resume=resume is not None)
    if result.is_main_process:
        if result.report is not None:
            print_report(result.report)
        print_summary(result.run_dir, result.summary)


@user_errors
def demo(
    output: Optional[str] = typer.Option(None, help="Run directory (default runs/demo-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a training setting."),
):
    """The quickstart: tune the embedded model on the bundled Spanish triage data, compare."""
    quiet_libraries()
    from rich.table import Table

    from afinar.demo import run_demo

    output = output or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}"
    result = run_demo(output, on_event=TrainProgress(), overrides=set_)
    print_report(result.report)
    print_summary(result.run_dir, result.train_summary)
    table = Table(title="Held-out prompts: base vs tuned", show_lines=True, expand=True)
    for name in ("prompt", "base model", "tuned model"):
        table.add_column(name, ratio=1, overflow="fold")
    rows, triage = result.report.data["examples"], result.triage_rows
    for row in result.showcase():
        table.add_row(row["prompt"][-1]["content"], row["baseline"]["answer"],
                      row["model"]["answer"])
    out.print(table)
    (base_fmt, tuned_fmt), (base_leak, tuned_leak) = result.adherence, result.leak
    out.print(f"Format adherence on {len(triage)} held-out triage prompts: base "
              f"{base_fmt:.0%}, tuned [bold]{tuned_fmt:.0%}[/]")
    out.print(f"Format leaking into {len(rows) - len(triage)} ordinary prompts: base "
              f"{base_leak:.0%}, tuned {tuned_leak:.0%}")
    out.print(f"Try it: .venv/bin/afinar chat {result.run_dir} --system \"Eres el asistente de "
              "soporte de Ferrolux, una tienda online de electrodomésticos.\"")
    out.print(f"Export it: .venv/bin/afinar export {result.run_dir} --to ollama --quant q8_0")
