"""A problem found in a data file, located by file, line and field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Issue:
    path: str
    line: int  # 1-based; 0 for a problem with the whole file
    field: str  # e.g. "messages[2].content"; "" when the whole line or file is at fault
    message: str
    hint: str = ""
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        field = f" {self.field}:" if self.field else ""
        text = f"{where}:{field} {self.message}"
        return f"{text} (hint: {self.hint})" if self.hint else text

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "line": self.line,
            "field": self.field,
            "message": self.message,
            "hint": self.hint,
            "severity": self.severity,
        }


class IssueSink:
    """Collects issues for one line so parsers can report every problem, not just the first."""

    def __init__(self, path: str, line: int, issues: list[Issue]):
        self.path, self.line, self._issues = path, line, issues
        self.failed = False

    def error(self, field: str, message: str, hint: str = "") -> None:
        self.failed = True
        self._issues.append(Issue(self.path, self.line, field, message, hint, "error"))

    def warning(self, field: str, message: str, hint: str = "") -> None:
        self._issues.append(Issue(self.path, self.line, field, message, hint, "warning"))
