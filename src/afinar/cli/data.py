"""`afinar data ...`: get a data set into shape: convert, dedupe, split (and synth).

afinar/cli/__init__.py mounts this with `app.add_typer(data_app, name="data")`. Every command
writes its output through a temp file and a rename, and only after the output passed `afinar
validate`'s checks: a failed command leaves no file that looks finished.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from afinar import rundir
from afinar.console import console, out, print_issues, user_errors
from afinar.errors import AfinarError

data_app = typer.Typer(no_args_is_help=True, help="Make a data set: convert a spreadsheet, FAQ "
                       "or another format; remove duplicates; split off a held-out file.")


def _default_output(source: Path, tag: str) -> Path:
    return source.with_name(f"{source.stem}.{tag}.jsonl")


def _check_output(source: Path, output: Path, force: bool) -> None:
    if output.resolve() == source.resolve():
        raise AfinarError(f"{output}: the output would overwrite the input",
                          "choose another --output")
    if output.exists() and not force:
        raise AfinarError(f"{output} already exists", "pass --force to replace it, or choose "
                          "another --output")


def _publish_validated(text: str, output: Path) -> None:
    """Writes `text` beside `output`, validates it as training data, renames it into place; on
    any error the temp file is removed and the problems printed."""
    from afinar.data.validate import load_examples

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}-", suffix=".jsonl", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        report = load_examples(tmp, check_size=False)
        if report.errors:
            print_issues(report.errors)
            raise AfinarError(f"the output would not pass `afinar validate` "
                              f"({len(report.errors)} problems above); nothing was written")
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for issue in report.warnings:
        console.print(f"[yellow]warning[/] {issue.message}" + (
            f" (hint: {issue.hint})" if issue.hint else ""), soft_wrap=True)


@data_app.command()
@user_errors
def convert(
    source: Path = typer.Argument(..., help="A .csv/.tsv/.xlsx with question and answer "
                                  "columns, a Markdown FAQ (.md), or a .jsonl in any format."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Output .jsonl (default SOURCE.FORMAT.jsonl)."),
    to: str = typer.Option("chat", help="Output format: chat, sharegpt, alpaca, "
                           "prompt_completion, text, dpo, preference."),
    system: Optional[str] = typer.Option(None, help="System prompt added to every example "
                                         "that has none."),
    question: Optional[str] = typer.Option(None, help="Spreadsheet column of the questions "
                                           "(guessed from names such as pregunta/question)."),
    answer: Optional[str] = typer.Option(None, help="Spreadsheet column of the answers."),
    sheet: Optional[str] = typer.Option(None, help=".xlsx: the sheet (default the first)."),
    force: bool = typer.Option(False, help="Replace an existing output file."),
):
    """Convert a spreadsheet, a FAQ document or another JSONL format into training data."""
    from afinar.data.convert import convert as run_convert
    from afinar.data.writers import WRITABLE, jsonl_text

    if to not in WRITABLE:
        raise AfinarError(f"--to {to!r}: unknown format", "use one of: " + ", ".join(WRITABLE))
    output = output or _default_output(source, to)
    _check_output(source, output, force)
    result = run_convert(source, to=to, system=system, question=question, answer=answer,
                         sheet=sheet)
    if result.errors:
        print_issues(result.errors)
        raise AfinarError(f"{source}: {len(result.errors)} example(s) could not be converted "
                          "(listed above); nothing was written", "fix them, or delete those "
                          "rows, and run the command again")
    _publish_validated(jsonl_text(result.records(to)), output)
    out.print(f"[green]wrote[/] {output}: {len(result.examples)} examples in {to} format, from "
              f"{result.source}" + (" with the system prompt added" if system else ""))


@data_app.command()
@user_errors
def dedupe(
    source: Path = typer.Argument(..., help="A .jsonl data file."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Output .jsonl (default SOURCE.dedup.jsonl)."),
    threshold: float = typer.Option(0.9, min=0.5, max=1.0, help="Similarity (0.5-1) from which "
                                    "two examples count as duplicates; 1 = exact only."),
    by: str = typer.Option("example", help="Compare whole examples, or only their prompts "
                           "(`prompt`: one answer per question is kept)."),
    dry_run: bool = typer.Option(False, help="Only list the duplicates."),
    force: bool = typer.Option(False, help="Replace an existing output file."),
):
    """Remove exact and near-duplicate examples; the first of each group is kept, lines as
    written."""
    from afinar.data.dedupe import drop_duplicates, find_duplicates
    from afinar.data.jsonl import raw_lines

    if by not in ("example", "prompt"):
        raise AfinarError(f"--by {by!r}: expected example or prompt")
    report = _usable(source)
    output = output or _default_output(source, "dedup")
    if not dry_run:
        _check_output(source, output, force)
    groups = find_duplicates(report.examples, threshold, by)
    for group in groups:
        dropped = ", ".join(f"{ex.line} ({'exact' if score == 1 else f'{score:.0%} similar'})"
                            for ex, score in group.dropped)
        out.print(f"  line {group.kept.line} kept; dropped: {dropped}")
    kept = drop_duplicates(report.examples, groups)
    removed = len(report.examples) - len(kept)
    out.print(f"{source}: {len(report.examples)} examples, {removed} duplicate(s) in "
              f"{len(groups)} group(s) at similarity >= {threshold:g} (by {by})")
    if dry_run:
        return
    lines = raw_lines(source)
    _publish_validated("".join(lines[ex.line] + "\n" for ex in kept), output)
    out.print(f"[green]wrote[/] {output}: {len(kept)} examples")


@data_app.command()
@user_errors
def split(
    source: Path = typer.Argument(..., help="A .jsonl data file."),
    held_out_fraction: float = typer.Option(0.2, "--held-out", min=0.01, max=0.9,
                                            help="Share held out."),
    seed: int = typer.Option(42, help="Seed of the split (as `afinar train`'s)."),
    train_output: Optional[Path] = typer.Option(None, help="Default SOURCE.train.jsonl."),
    held_out_output: Optional[Path] = typer.Option(None, help="Default SOURCE.held-out.jsonl."),
    force: bool = typer.Option(False, help="Replace existing output files."),
):
    """Split into a training file and a held-out file: exactly the split `afinar train` makes
    with the same fraction and seed (duplicates stay on one side), lines as written."""
    from afinar.data.jsonl import raw_lines
    from afinar.data.split import split_examples, split_method

    report = _usable(source)
    train_output = train_output or _default_output(source, "train")
    held_out_output = held_out_output or _default_output(source, "held-out")
    for path in (train_output, held_out_output):
        _check_output(source, path, force)
    train, held = split_examples(report.examples, held_out_fraction, seed)
    lines = raw_lines(source)
    for part, path in ((train, train_output), (held, held_out_output)):
        # Original order within each part: a reader can find every line in the source.
        rundir.write_text_atomic(path, "".join(lines[ex.line] + "\n"
                                               for ex in sorted(part, key=lambda e: e.line)))
    out.print(f"[green]wrote[/] {train_output} ({len(train)} examples) and {held_out_output} "
              f"({len(held)}), {split_method(held_out_fraction, seed)}; train on them with "
              f"`afinar train --data {train_output} --validation-data {held_out_output}`")


def _usable(source: Path):
    from afinar.data.validate import load_examples

    report = load_examples(source, check_size=False)
    if report.errors:
        print_issues(report.errors)
        raise AfinarError(f"{source}: {len(report.errors)} problem(s) listed above",
                          "fix them first: `afinar validate` lists the same")
    return report


@data_app.command()
@user_errors
def synth(
    output: Path = typer.Option(..., "--output", "-o", help="Output .jsonl (chat format)."),
    base_url: str = typer.Option(..., help="An OpenAI-compatible endpoint, e.g. "
                                 "https://api.openai.com/v1, http://127.0.0.1:11434/v1 (Ollama), "
                                 "http://127.0.0.1:8000/v1 (afinar serve)."),
    model: str = typer.Option(..., help="The model that writes the examples."),
    count: int = typer.Option(20, min=1, help="Examples wanted."),
    topic: List[str] = typer.Option([], "--topic", help="A topic to write about (repeatable)."),
    seeds: Optional[Path] = typer.Option(None, help="A data file whose examples show the style "
                                         "(and are never repeated)."),
    documents: List[Path] = typer.Option([], "--documents", help="Text the answers come from: "
                                         ".md/.txt files or folders (repeatable)."),
    system: Optional[str] = typer.Option(None, help="System prompt the examples carry."),
    language: Optional[str] = typer.Option(None, help="Language to write in, e.g. Spanish."),
    per_request: int = typer.Option(5, min=1, max=20, help="Examples asked for per request."),
    temperature: float = typer.Option(0.9, min=0, max=2),
    max_tokens: int = typer.Option(1024, min=16, help="Longest reply per request."),
    similarity: float = typer.Option(0.85, min=0.5, max=1.0, help="Question similarity from "
                                     "which an example counts as a duplicate."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding the "
                                    "key (none needed for a local server)."),
    seed: int = typer.Option(0, help="Seed of the prompt sampling."),
):
    """Generate examples with a model behind any OpenAI-compatible API: each checked, duplicates
    dropped, the output resumable (OUTPUT.partial until COUNT examples are in)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    from afinar.data.synth import SynthSettings, chunk_documents, synthesize

    examples = _usable(seeds).examples if seeds else []
    settings = SynthSettings(
        base_url=base_url, model=model, count=count, topics=topic, seeds=examples,
        documents=chunk_documents(documents) if documents else [], system=system,
        language=language, per_request=per_request, temperature=temperature,
        max_tokens=max_tokens,
        similarity=similarity, api_key=os.environ.get(api_key_env), seed=seed)
    with Progress(TextColumn("[bold]synth[/]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("synth", total=count, note="")
        result = synthesize(settings, output, on_progress=lambda r: bar.update(
            task, completed=r.written, note=f"{r.requests} requests, {r.duplicates} duplicates, "
            f"{r.invalid} invalid"))
    counts = (f"{result.requests} requests, {result.generated} pairs returned, "
              f"{result.invalid} invalid, {result.duplicates} duplicates dropped, "
              f"{result.retried} retries, {result.seconds:.0f} s")
    if not result.complete:
        raise AfinarError(f"only {result.written} of {count} examples after {counts}; they are "
                          f"in {output}.partial", "run the same command again to continue, or "
                          "try a stronger model, other topics or more seeds")
    out.print(f"[green]wrote[/] {output}: {result.written} examples ({counts})")
