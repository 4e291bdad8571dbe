"""`afinar chat` and `afinar generate`: answers from a model or a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from afinar.cli.common import (engine_option, generation_settings, notify, quiet_libraries,
                               say_engine)
from afinar.console import console, out, user_errors
from afinar.models.registry import DEFAULT_MODEL

@user_errors
def chat(
    model: str = typer.Argument(DEFAULT_MODEL, help="Model name/path or a run directory."),
    system: Optional[str] = typer.Option(None, help="System message for the conversation."),
    max_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default); higher = more varied."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold (with temperature > 0)."),
    engine: str = engine_option(),
):
    """Talk to a model or a trained run. /reset clears the conversation, /exit quits."""
    quiet_libraries()
    from afinar.engines import open_model

    settings = generation_settings(max_tokens, temperature, top_p)
    loaded = open_model(model, engine, notify=notify, slots=1)
    try:
        say_engine(loaded)
        _converse(loaded, system, settings)
    finally:
        loaded.close()


def _converse(loaded, system: str | None, settings) -> None:
    console.print(f"[dim]{loaded.name} ready. /reset clears, /exit or Ctrl-D quits.[/]")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    while True:
        try:
            text = console.input("[bold cyan]> [/]")
        except EOFError:
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(start)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        pieces = []
        for piece in loaded.stream(history, settings):
            pieces.append(piece)
            out.print(piece, end="", soft_wrap=True)
        out.print()
        history.append({"role": "assistant", "content": "".join(pieces).strip()})


@user_errors
def generate(
    model: str = typer.Argument(..., help="Model name/path or a run directory."),
    input: Path = typer.Option(..., "--input", "-i", help="Conversations (.jsonl)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the answers."),
    max_tokens: int = typer.Option(256, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling threshold."),
    batch_size: int = typer.Option(8, help="Prompts generated together (transformers; "
                                   "llama.cpp answers in its parallel slots)."),
    engine: str = engine_option(),
):
    """Answer every conversation of a file (a trailing assistant turn is replaced)."""
    quiet_libraries()
    from rich.progress import Progress

    from afinar.engines import open_model
    from afinar.infer.generate import generate_file

    settings = generation_settings(max_tokens, temperature, top_p)
    loaded = open_model(model, engine, notify=notify)
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("generating", total=None)
            count = generate_file(loaded, str(input), str(output), settings, batch_size,
                                  lambda done, total: bar.update(task, completed=done,
                                                                 total=total))
    finally:
        loaded.close()
    note = f"; {loaded.engine_note}" if loaded.engine_note else ""
    out.print(f"wrote {count} answers to {output} (engine: {loaded.engine}{note})")
