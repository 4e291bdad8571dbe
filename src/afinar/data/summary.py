"""A data file's validation report: `afinar validate`'s, and a summary for the server.

    report = validation_report("train.jsonl", model="smollm2-135m-instruct")   # `afinar validate`
    summary = file_summary("train.jsonl")    # issues, format, split, duplicates, a sample
"""

from __future__ import annotations

from typing import Callable

from afinar.data.consistency import add_to_report
from afinar.data.split import split_report
from afinar.data.stats import duplicates_and_contradictions
from afinar.data.validate import load_examples


def validation_report(path, format: str | None = None, model: str | None = None,
                      max_seq_length: int = 1024, held_out_fraction: float = 0.2, seed: int = 42,
                      notify: Callable[[str], None] = lambda message: None):
    """The ValidationReport with its stats: token statistics with `model`'s tokenizer (None:
    without them, nothing loaded), duplicates, consistency, and the held-out split `afinar
    train` would make."""
    from afinar.data.prepare import describe_data

    report = load_examples(path, format)
    if model and report.examples:
        describe_data(report, _encoded(report, model, notify), max_seq_length, "truncate")
    elif report.examples:
        add_to_report(report)
    if report.examples:
        report.stats["split"] = split_report(report.examples, held_out_fraction, seed)
    return report


def _example(ex) -> dict:
    return {"line": ex.line, "text": ex.text, "rejected": ex.rejected,
            "messages": [{"role": m.role, "content": m.content} for m in ex.messages]}


def file_summary(path, display_name: str | None = None, held_out_fraction: float = 0.2,
                 seed: int = 42, sample: int = 20, tokenizer_of: str | None = None,
                 max_seq_length: int = 1024) -> dict:
    """Every problem (line, field, message, hint), the counts, the held-out split a job would
    make, duplicates and contradictions, and the first `sample` examples; with `tokenizer_of`
    (a model spec), the token statistics `afinar validate` gives with that model's tokenizer."""
    report = load_examples(path)
    consistency = add_to_report(report)
    shown = display_name or str(path)
    issues = [{**issue.to_dict(), "path": shown} for issue in report.issues]
    out = {"format": report.format, "examples": len(report.examples), "ok": report.ok,
           "errors": len(report.errors), "warnings": len(report.warnings), "issues": issues,
           "sample": [_example(ex) for ex in report.examples[:sample]]}
    if report.examples:
        out["split"] = split_report(report.examples, held_out_fraction, seed)
        out.update(duplicates_and_contradictions(report.examples))
        out["consistency"], out["advice"] = consistency["stats"], consistency["advice"]
        if tokenizer_of and report.ok:
            out["tokens"] = _token_stats(report, tokenizer_of, max_seq_length)
    return out


def _encoded(report, model: str, notify: Callable[[str], None] = lambda message: None) -> list:
    """The report's examples tokenised as training would: with `model`'s tokenizer and chat
    template, as preference pairs when the file holds pairs."""
    from afinar.data.formats import format_family
    from afinar.data.prepare import encode_for
    from afinar.data.tokenize import ChatEncoder
    from afinar.models.load import load_tokenizer, stop_token_ids
    from afinar.models.registry import resolve_model

    tokenizer = load_tokenizer(resolve_model(model, notify=notify).tokenizer_source)
    return encode_for(report.examples, ChatEncoder(tokenizer, stop_token_ids(tokenizer)),
                      pairs=format_family(report.format) == "preference")


def _token_stats(report, model: str, max_seq_length: int) -> dict:
    from afinar.data.formats import format_family
    from afinar.data.stats import token_stats

    encoded = _encoded(report, model)
    pairs = format_family(report.format) == "preference"
    sequences = [side for p in encoded for side in p.sides()] if pairs else encoded
    return {"model": model, **token_stats(sequences, max_seq_length, "truncate")}
