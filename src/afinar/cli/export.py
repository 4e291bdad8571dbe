"""`afinar export` and `afinar card`: verified exports (afinar.export) and the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from afinar.cli.common import notify, quiet_libraries
from afinar.console import console, out, user_errors
from afinar.errors import AfinarError

@user_errors
def export(
    run: str = typer.Argument(..., help="A run directory, or a version id/tag of one."),
    to: str = typer.Option("gguf", "--to", help="merged | gguf | gguf-adapter | ollama"),
    quant: Optional[str] = typer.Option(
        None, "--quant", help="merged: f32/f16/bf16 (default f32). gguf/ollama: f32, f16 "
        "(default), bf16, q8_0, or q4_k_m, q5_k_m, q6_k... (llama.cpp's quantiser). "
        "gguf-adapter: f32 (default) or f16."),
    output: Optional[str] = typer.Option(None, help="Output folder (default: "
                                         "RUN/exports/FORMAT-TYPE)."),
    verify: bool = typer.Option(True, help="Check the export answers golden held-out prompts "
                                "like the trained model (same prompt ids, same greedy tokens)."),
    prompts: int = typer.Option(8, help="Golden prompts to verify with."),
    exact_tokens: int = typer.Option(32, help="Tokens of each answer compared; f32/f16/bf16 "
                                     "must agree exactly on them."),
    min_agreement: Optional[float] = typer.Option(None, help="Quantised types: the share of "
                                                  "the trained answers' tokens the export must "
                                                  "choose too, teacher-forced (default by type: "
                                                  "q8_0 0.9, q6/q5 0.85, q4 0.7, else 0.5)."),
    name: Optional[str] = typer.Option(None, help="Model name in the files (default: the "
                                       "run's folder name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Export a run as merged weights, GGUF, a GGUF LoRA adapter or an Ollama folder, verified."""
    quiet_libraries()
    from afinar.export import export as run_export
    from afinar.export.verify import VerificationFailed

    if prompts < 1 or exact_tokens < 1:
        raise AfinarError("--prompts and --exact-tokens must be at least 1")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise AfinarError("--min-agreement is a share between 0 and 1, e.g. 0.8")
    try:
        result = run_export(run, to=to, quant=quant, output=output, verify=verify,
                            prompts=prompts, exact_tokens=exact_tokens,
                            min_agreement=min_agreement, name=name, notify=notify)
    except VerificationFailed as exc:
        for line in exc.report.lines():
            console.print(line)
        raise
    if as_json:
        out.print_json(data={
            "format": result.format, "type": result.kind, "output": str(result.output),
            "files": result.files, "seconds": round(result.seconds, 1), "command": result.command,
            "verification": result.verification.summary() if result.verification else None})
        return
    if result.verification:
        for line in result.verification.lines():
            console.print(line)
    else:
        console.print("[yellow]not verified (--no-verify)[/]")
    for file, size in result.files.items():
        console.print(f"  {result.output / file}  {size / 1e6:.1f} MB")
    console.print(f"[green]exported[/] {result.format} {result.kind} to {result.output} in "
                  f"{result.seconds:.0f} s")
    if result.command:
        console.print(f"next: {result.command}")


@user_errors
def card(
    run: str = typer.Argument(..., help="A run directory, or a version id/tag of one."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the card to this "
                                          "file (e.g. RUN/README.md) instead of printing it."),
):
    """The run's model card (README.md in the Hugging Face convention): base, data, settings,
    results, base vs tuned, known leaks, license."""
    from afinar.model_card import render_card
    from afinar.rundir import write_text_atomic
    from afinar.versions import registered_run

    text = render_card(registered_run(run) or Path(run))
    if output is None:
        print(text, end="")
        return
    write_text_atomic(output, text)
    console.print(f"wrote {output}")
