"""Reads and checks a data file, collecting every problem (never only the first).

    report = load_examples("train.jsonl")          # format detected per file
    report.ok, report.examples, report.issues       # issues print as PATH:LINE: field: message

`afinar validate` adds the tokenizer statistics from `afinar.data.stats` on top of this.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from afinar.data.example import Example
from afinar.data.format_parts import require_trainable
from afinar.data.formats import FORMATS, detect_format, formats_help, messages_field
from afinar.data.issues import Issue, IssueSink
from afinar.data.jsonl import read_jsonl
from afinar.errors import AfinarError

MIN_EXAMPLES = 10  # as OpenAI's fine-tuning API: fewer cannot teach anything measurable
RECOMMENDED_EXAMPLES = 100  # the guides' rule of thumb for a visible, stable change


@dataclass
class ValidationReport:
    path: str
    format: str | None
    examples: list[Example]
    issues: list[Issue]
    stats: dict = field(default_factory=dict)  # filled by afinar.data.stats

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "examples": len(self.examples),
                "ok": self.ok, "issues": [i.to_dict() for i in self.issues], "stats": self.stats}


def _file_format(records: list[tuple[int, dict]], path: str, issues: list[Issue]) -> str | None:
    """The format most lines have; lines in another format, or none, are errors."""
    detected = [(line, detect_format(rec)) for line, rec in records]
    counts = Counter(name for _, name in detected if name)
    if not counts:
        if records:
            keys = ", ".join(sorted(records[0][1])) or "no keys"
            issues.append(Issue(path, records[0][0], "", f"unknown example format (keys: {keys})",
                                f"use one of: {formats_help()}"))
        return None
    chosen = counts.most_common(1)[0][0]
    for line, name in detected:
        if name is None:
            issues.append(Issue(path, line, "", "unknown example format",
                                f"this file is in {chosen} format: {FORMATS[chosen].description}"))
        elif name != chosen:
            issues.append(Issue(path, line, "", f"mixed formats: this line is {name} but the file "
                                f"is {chosen}", "keep one format per file, or split the file"))
    return chosen


def load_examples(path: str | Path, format: str | None = None, for_training: bool = True,
                  check_size: bool = True) -> ValidationReport:
    """Parses `path` into Examples; the report lists every problem found.

    With for_training=False (inputs to `generate`), conversations need no assistant answer and
    the size checks are skipped; check_size=False skips only the latter (a part of a data set:
    a held-out file, a file being cleaned).
    """
    shown = str(path)
    if format is not None and format not in FORMATS:
        raise AfinarError(f"unknown format {format!r}", f"use one of: {', '.join(FORMATS)}")
    issues: list[Issue] = []
    records = read_jsonl(path, issues)
    fmt = format or _file_format(records, shown, issues)
    examples: list[Example] = []
    if fmt is not None:
        parse = FORMATS[fmt].parse
        for line, record in records:
            if format is None and detect_format(record) != fmt:
                continue  # already reported as mixed/unknown
            sink = IssueSink(shown, line, issues)
            example = parse(record, sink)
            if example is not None and for_training:
                require_trainable(example, messages_field(fmt), sink)
                example = None if sink.failed else example
            if example is not None:
                examples.append(replace(example, path=shown, line=line))

    if for_training and check_size and (records or examples):
        _check_size(len(examples), shown, issues)
    issues.sort(key=lambda i: (i.line, i.severity != "error"))
    return ValidationReport(shown, fmt, examples, issues)


def _check_size(count: int, path: str, issues: list[Issue]) -> None:
    if count < MIN_EXAMPLES:
        issues.append(Issue(path, 0, "", f"only {count} usable examples; at least {MIN_EXAMPLES} "
                            "are needed", "write more examples of the behaviour you want"))
    elif count < RECOMMENDED_EXAMPLES:
        issues.append(Issue(
            path, 0, "", f"{count} examples: fine-tuning usually needs 50-100+ well-chosen examples "
            "for a stable change; with fewer the model may learn the format only partly",
            "add examples, or check the held-out adherence after training", "warning"))
