"""Reads a JSON Lines file defensively: any bytes in, records or located issues out, never a crash.

CRLF line ends, a UTF-8 byte-order mark and blank lines are accepted; everything else that is not
one JSON object per line becomes an Issue naming the line.
"""

from __future__ import annotations

import json
from pathlib import Path

from afinar.data.issues import Issue
from afinar.errors import AfinarError

_BOM = b"\xef\xbb\xbf"
_JSONL_HINT = "JSON Lines holds one JSON object per line, e.g. {\"messages\": [...]}"


def _type_name(value) -> str:
    return {list: "an array", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


def _is_json_array(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw.decode("utf-8")), list)
    except (ValueError, RecursionError):
        return False


def read_jsonl(path: str | Path, issues: list[Issue]) -> list[tuple[int, dict]]:
    """Returns (line number, object) for every readable line; appends an Issue for every other."""
    path = Path(path)
    shown = str(path)
    if not path.exists():
        raise AfinarError(f"{shown}: no such file", "check the path; data files are .jsonl")
    if path.is_dir():
        raise AfinarError(f"{shown}: is a folder, not a file", "pass the .jsonl file inside it")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise AfinarError(f"{shown}: cannot read: {exc.strerror}") from None

    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    if not raw.strip():
        issues.append(Issue(shown, 0, "", "the file is empty", "add one JSON example per line"))
        return []
    if raw.lstrip().startswith(b"[") and _is_json_array(raw):
        issues.append(Issue(
            shown, 1, "", "the file is a JSON array, not JSON Lines",
            "write one object per line; e.g. `jq -c '.[]' data.json > data.jsonl`"))
        return []

    records: list[tuple[int, dict]] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.append(Issue(
                shown, number, "", f"not valid UTF-8 (byte 0x{line[exc.start]:02x} at column "
                f"{exc.start + 1})", "save the file with UTF-8 encoding"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            issues.append(Issue(shown, number, "", f"invalid JSON: {exc.msg} at column {exc.colno}",
                                _JSONL_HINT))
            continue
        except RecursionError:
            issues.append(Issue(shown, number, "", "invalid JSON: nested too deeply", _JSONL_HINT))
            continue
        except ValueError as exc:  # e.g. an integer longer than Python's digit limit
            issues.append(Issue(shown, number, "", f"invalid JSON: {exc}", _JSONL_HINT))
            continue
        if not isinstance(value, dict):
            issues.append(Issue(shown, number, "", f"expected a JSON object, got {_type_name(value)}",
                                _JSONL_HINT))
            continue
        records.append((number, value))
    return records


def raw_lines(path: str | Path) -> dict[int, str]:
    """Line number → the line's text as written (without its line end), numbered as
    `read_jsonl` numbers them: commands that keep or drop examples copy lines untouched."""
    raw = Path(path).read_bytes()
    if raw.startswith(_BOM):
        raw = raw[len(_BOM):]
    return {number: line.rstrip(b"\r").decode("utf-8", "replace")
            for number, line in enumerate(raw.split(b"\n"), start=1)}
