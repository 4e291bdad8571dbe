"""Errors that mean "the user asked for something we cannot do", as opposed to bugs.

The CLI prints these as one clear message and exits non-zero, without a traceback; anything
else that escapes is a bug in afinar and keeps its traceback.
"""

from __future__ import annotations


class AfinarError(Exception):
    """A user-facing error: bad input, missing file, impossible option combination."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class DataError(AfinarError):
    """The dataset is unusable; carries the validation report that says why."""

    def __init__(self, message: str, report=None, hint: str | None = None):
        super().__init__(message, hint)
        self.report = report
