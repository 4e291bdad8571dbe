"""`afinar validate`: every problem of a data file as PATH:LINE: field: message, then a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from afinar.cli.common import notify, quiet_libraries
from afinar.console import out, print_issues, user_errors
from afinar.models.registry import DEFAULT_MODEL


@user_errors
def validate(
    path: Path = typer.Argument(..., help="Data file (.jsonl)."),
    model: str = typer.Option(DEFAULT_MODEL, help="Model whose tokenizer counts the tokens."),
    format: Optional[str] = typer.Option(None, help="Force a format instead of detecting it."),
    max_seq_length: int = typer.Option(1024, help="Report examples longer than this."),
    tokens: bool = typer.Option(True, help="Compute token statistics (loads the tokenizer)."),
    held_out_fraction: float = typer.Option(0.2, help="Share held out by `afinar train`."),
    seed: int = typer.Option(42, help="Seed of the train/held-out split."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check a data file: every problem as PATH:LINE: field: message, then a report."""
    from afinar.data.summary import validation_report

    if tokens:
        quiet_libraries()
    report = validation_report(path, format, model if tokens else None, max_seq_length,
                               held_out_fraction, seed, notify)
    if as_json:
        out.print_json(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print_issues(report.issues)
        _print_data_report(report)
    raise typer.Exit(0 if report.ok else 1)


def _print_data_report(report) -> None:
    verdict = "[green]usable[/]" if report.ok else "[red]not usable[/]"
    out.print(f"{report.path}: {len(report.examples)} examples, format {report.format}, "
              f"{len(report.errors)} errors, {len(report.warnings)} warnings: {verdict}")
    s = report.stats
    if s.get("examples"):
        out.print(f"  tokens per example: min {s['tokens_min']}, median {s['tokens_median']}, "
                  f"p95 {s['tokens_p95']}, max {s['tokens_max']} (total {s['tokens_total']})")
        out.print(f"  supervised (trained) tokens: {s['supervised_tokens']} "
                  f"({s['supervised_share']:.0%})")
        out.print(f"  longer than {s['max_seq_length']} tokens: {s['over_max_seq_length']} "
                  f"(will be {s['over_max_action']})")
    if "split" in s:
        out.print(f"  train / held out: {s['split']['train']} / {s['split']['held_out']} "
                  f"({s['split']['method']}; `afinar train --validation-data` uses a file instead)")
    if pref := s.get("preference"):
        out.print(f"  answers, chosen vs rejected: {pref['chosen_answer_tokens_mean']:.0f} vs "
                  f"{pref['rejected_answer_tokens_mean']:.0f} tokens on average; chosen longer in "
                  f"{pref['chosen_longer_share']:.0%} of pairs, shorter in "
                  f"{pref['chosen_shorter_share']:.0%}")
        out.print(f"  pairs over max_seq_length: {pref['pairs_prompt_truncated']} keep their answers "
                  f"with the prompt cut from its start, {pref['pairs_dropped_by_length']} dropped "
                  "(answers alone too long)")
        if pref.get("length_warning"):
            out.print(f"  [yellow]warning[/]: {pref['length_warning']}")
    elif (shape := s.get("format")) and shape.get("one_format"):
        from afinar.data.prepare import one_format_warning

        out.print(f"  [yellow]warning[/]: {one_format_warning(shape, preserve=True)} "
                  "(preserve is on by default for LoRA)")
    if c := s.get("consistency"):
        out.print(f"  answer length: median {c['answer_words_median']:g} words (middle half "
                  f"{c['answer_words_p25']:g}-{c['answer_words_p75']:g}, range "
                  f"{c['answer_words_min']}-{c['answer_words_max']}); commonest shape "
                  f"{c['dominant_answer_shape']!r} in {c['dominant_shape_share']:.0%}")
    for advice in s.get("advice", []):
        out.print(f"  [cyan]advice[/]: {advice}")
    if "duplicate_groups" in s:
        out.print(f"  exact duplicates: {len(s['duplicate_groups'])} group(s)"
                  + (f", lines {s['duplicate_groups'][:5]}" if s["duplicate_groups"] else ""))
        out.print(f"  contradictions (same prompt, different answers): "
                  f"{len(s['contradiction_groups'])}"
                  + (f", lines {s['contradiction_groups'][:5]}" if s["contradiction_groups"]
                     else ""))
