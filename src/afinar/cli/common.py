"""What the command modules share: quiet libraries, the progress line, printing a report or a
run's summary, parsing a number, generation settings, and help texts taken from the typed config
(an option documented once, where the setting is defined)."""

from __future__ import annotations

import os

import typer

from afinar.console import console, out
from afinar.errors import AfinarError


def config_help(name: str, prefix: str = "") -> str:
    """The description of TrainConfig's field `name`: the one place a setting is explained."""
    from afinar.config import TrainConfig

    return prefix + (TrainConfig.model_fields[name].description or "")


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def notify(message: str) -> None:
    console.print(f"[dim]{message}[/]")


def print_report(report) -> None:
    from rich.markdown import Markdown

    out.print(Markdown(report.markdown))
    out.print(f"Report: {report.output / 'report.html'}")


def parse_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AfinarError(f"{name}: expected a number or auto, got {value!r}") from None


def print_summary(run_dir, s: dict) -> None:
    best = (f"best held-out loss {s['best_eval_loss']:.4f} at step {s['best_step']}"
            if s.get("best_eval_loss") is not None else "no held-out data")
    out.print(f"[green]done[/] {s['steps']} steps in {s['train_seconds']:.0f} s, "
              f"{s['tokens_per_s']:.0f} tokens/s, peak memory {s['peak_memory_mb']:.0f} MB; "
              f"{best}" + (" (stopped early)" if s.get("stopped_early") else ""))
    out.print(f"Talk to it: afinar chat {run_dir}")


ENGINE_HELP = ("What answers: llamacpp (llama.cpp's server on a cached GGUF of the base, the "
               "run's LoRA as a GGUF adapter), transformers, or auto (llama.cpp on a CPU when "
               "installed and the model converts).")


def engine_option():
    return typer.Option("auto", "--engine", help=ENGINE_HELP)


def say_engine(model) -> None:
    """One line on which engine answers (and why, when it was not the one asked for)."""
    from afinar.console import console

    note = f" ({model.engine_note})" if model.engine_note else ""
    console.print(f"[dim]engine: {model.engine}{note}[/]")


def generation_settings(max_tokens: int, temperature: float, top_p: float):
    from afinar.infer.generate import GenerationSettings

    if temperature < 0 or not 0 < top_p <= 1 or max_tokens < 1:
        raise AfinarError("need temperature >= 0, 0 < top-p <= 1 and max-tokens >= 1")
    return GenerationSettings(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)
