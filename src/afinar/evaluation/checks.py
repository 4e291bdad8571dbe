"""User-declared checks on generated answers, per dataset (a YAML file) or per example.

A checks file (`checks: FILE` in a train config, or `afinar eval --checks FILE`):

    checks:
      - name: format_adherence                 # reported as check:format_adherence
        when: {system_contains: Ferrolux}      # optional: which prompts it applies to
        regex: "^Categoría: .+\\nPrioridad: .+$"   # the whole answer must match
      - name: no_ticket_format
        when: {system_lacks: Ferrolux}
        must_not_match: "Categoría:"
      - {name: valid_json, json: true}
      - {name: schema, json_schema: schema.json}      # a file beside this one, or inline
    leak_regex: "Categoría:"   # the taught format's signature, looked for in unrelated prompts

An example line may carry its own: `"expected_topics": ["refund", "14 days"]` or
`"checks": {"regex": "...", "json_schema": {...}, "expected_topics": [...]}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Union

from pydantic import Field, model_validator

from afinar.config import StrictModel, build_config, read_yaml
from afinar.data.example import Example
from afinar.errors import AfinarError
from afinar.evaluation.metrics import normalize

KINDS = ("regex", "must_not_match", "json", "json_schema", "expected_topics")
_ATTR = {"json": "is_json"}  # kind as written in files -> attribute


class Scope(StrictModel):
    system_contains: str | None = Field(None, description="The system message contains this.")
    system_lacks: str | None = Field(None, description="No system message contains this.")
    prompt_matches: str | None = Field(None, description="A regex found in the last user turn.")

    def applies(self, example: Example) -> bool:
        system = "\n".join(m.content for m in example.messages if m.role == "system")
        users = [m.content for m in example.prompt_messages() if m.role == "user"]
        if self.system_contains is not None and self.system_contains not in system:
            return False
        if self.system_lacks is not None and self.system_lacks in system:
            return False
        if self.prompt_matches is not None and not (
                users and re.search(self.prompt_matches, users[-1])):
            return False
        return True


class CheckSpec(StrictModel):
    name: str
    when: Scope | None = None
    regex: str | None = Field(None, description="The whole answer (trimmed) must match.")
    must_not_match: str | None = Field(None, description="The answer must not contain a match.")
    # `json` in files; the attribute has another name because pydantic models have .json().
    is_json: bool = Field(False, alias="json", description="The answer must be valid JSON.")
    json_schema: Union[dict, str, None] = Field(None, description="The answer must be JSON "
                                                "valid under this schema (inline or a file).")
    expected_topics: list[str] | None = Field(None, description="Words/phrases the answer must "
                                              "mention (case and accents ignored).")

    @model_validator(mode="after")
    def _one_kind(self) -> "CheckSpec":
        kinds = [k for k in KINDS if getattr(self, _ATTR.get(k, k)) not in (None, False)]
        if len(kinds) != 1:
            raise ValueError(f"a check needs exactly one of {', '.join(KINDS)} (got "
                             f"{', '.join(kinds) or 'none'})")
        for key in ("regex", "must_not_match"):
            if getattr(self, key) is not None:
                try:
                    re.compile(getattr(self, key))
                except re.error as exc:
                    raise ValueError(f"{key}: not a valid regular expression: {exc}") from None
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, _ATTR.get(k, k)) not in (None, False))


class ChecksFile(StrictModel):
    checks: list[CheckSpec] = Field(default_factory=list)
    leak_regex: str | None = Field(None, description="The taught format's signature: prompts "
                                   "outside its scope whose answers contain it count as leaks.")


@dataclass
class CheckResult:
    name: str
    passed: bool
    score: float  # 1/0 for pass/fail checks; the share of topics found for expected_topics
    detail: str = ""


@dataclass
class CheckSet:
    specs: list[CheckSpec] = field(default_factory=list)
    leak_regex: str | None = None
    source: str | None = None

    def for_example(self, example: Example) -> list[CheckSpec]:
        own = example_checks(example)
        return [s for s in self.specs if s.when is None or s.when.applies(example)] + own

    @cached_property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]


def load_checks(path: str | Path | None) -> CheckSet:
    if not path:
        return CheckSet()
    path = Path(path)
    parsed: ChecksFile = build_config(ChecksFile, read_yaml(path), str(path),
                                      "the checks file format is described in docs/evaluation.md")
    specs = []
    for spec in parsed.checks:
        if isinstance(spec.json_schema, str):  # a schema file, relative to the checks file
            spec = spec.model_copy(update={"json_schema": _read_schema(path.parent / spec.json_schema,
                                                                       f"{path}: {spec.name}")})
        _check_schema(spec, f"{path}: check {spec.name}")
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise AfinarError(f"{path}: two checks share a name", "give every check its own name")
    return CheckSet(specs, parsed.leak_regex, str(path))


def _read_schema(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AfinarError(f"{where}: cannot read JSON Schema {path}: {exc}") from None


def _check_schema(spec: CheckSpec, where: str) -> None:
    if isinstance(spec.json_schema, dict):
        from jsonschema import Draft202012Validator, SchemaError, validators

        try:
            validators.validator_for(spec.json_schema, Draft202012Validator).check_schema(
                spec.json_schema)
        except SchemaError as exc:
            raise AfinarError(f"{where}: invalid JSON Schema: {exc.message}") from None


def example_checks(example: Example) -> list[CheckSpec]:
    """Checks carried by the example's own line (`checks` object, or `expected_topics`)."""
    raw: dict[str, Any] = dict(example.extra.get("checks") or {})
    for key in ("expected_topics", "json_schema"):
        if key in example.extra:
            raw.setdefault(key, example.extra[key])
    specs = []
    for kind, value in raw.items():
        try:
            spec = CheckSpec.model_validate({"name": kind, kind: value})
        except Exception as exc:  # pydantic's message, re-worded with the line
            raise AfinarError(f"{example.where}: checks.{kind}: {_first_error(exc)}",
                              f"allowed checks: {', '.join(KINDS)}") from None
        _check_schema(spec, f"{example.where}: checks.{kind}")
        specs.append(spec)
    return specs


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        return str(first.get("msg", exc)).removeprefix("Value error, ")
    return str(exc)


def run_check(spec: CheckSpec, answer: str) -> CheckResult:
    text = answer.strip()
    kind = spec.kind
    if kind == "regex":
        ok = re.fullmatch(spec.regex, text) is not None
        return CheckResult(spec.name, ok, float(ok), "" if ok else "does not match the format")
    if kind == "must_not_match":
        found = re.search(spec.must_not_match, text)
        return CheckResult(spec.name, found is None, float(found is None),
                           f"contains {found.group(0)!r}" if found else "")
    try:
        value = json.loads(text)
    except ValueError as exc:
        if kind in ("json", "json_schema"):
            return CheckResult(spec.name, False, 0.0, f"not JSON: {exc}")
        value = None
    if kind == "json":
        return CheckResult(spec.name, True, 1.0)
    if kind == "json_schema":
        from jsonschema import Draft202012Validator, validators

        cls = validators.validator_for(spec.json_schema, Draft202012Validator)
        error = next(iter(cls(spec.json_schema).iter_errors(value)), None)
        if error is None:
            return CheckResult(spec.name, True, 1.0)
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return CheckResult(spec.name, False, 0.0, f"schema: {where}: {error.message}")
    # expected_topics
    said = normalize(text)
    missing = [t for t in spec.expected_topics if normalize(t) not in said]
    found = len(spec.expected_topics) - len(missing)
    score = found / len(spec.expected_topics) if spec.expected_topics else 1.0
    return CheckResult(spec.name, not missing, score,
                       f"missing: {', '.join(missing)}" if missing else "")
