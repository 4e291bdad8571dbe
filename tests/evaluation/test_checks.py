"""Declared checks: regex, must_not_match, JSON, JSON Schema, expected topics; scopes; errors."""

from __future__ import annotations

import json

import pytest

from afinar.data.example import Example, Message
from afinar.errors import AfinarError
from afinar.evaluation.checks import CheckSpec, example_checks, load_checks, run_check


def _spec(**kw) -> CheckSpec:
    return CheckSpec.model_validate({"name": "c", **kw})


def _example(system: str | None = None, extra: dict | None = None) -> Example:
    msgs = ([Message("system", system)] if system else []) + [
        Message("user", "hola"), Message("assistant", "Categoría: envío", True)]
    return Example(tuple(msgs), path="data.jsonl", line=7, extra=extra or {})


def test_regex_must_match_the_whole_answer():
    fmt = _spec(regex=r"Categoría: \w+\nPrioridad: (alta|baja)")
    assert run_check(fmt, "Categoría: envío\nPrioridad: alta\n").passed  # trailing newline trimmed
    result = run_check(fmt, "Claro. Categoría: envío\nPrioridad: alta")
    assert not result.passed and result.score == 0.0


def test_must_not_match_says_what_it_found():
    result = run_check(_spec(must_not_match="Categoría:"), "Hola.\nCategoría: cuenta")
    assert (result.passed, result.score) == (False, 0.0) and "Categoría:" in result.detail
    assert run_check(_spec(must_not_match="Categoría:"), "Hola, ¿qué tal?").score == 1.0


def test_json_and_schema():
    assert run_check(_spec(json=True), '{"a": 1}').score == 1.0
    bad = run_check(_spec(json=True), "{'a': 1}")
    assert bad.score == 0.0 and bad.detail.startswith("not JSON")
    schema = {"type": "object", "required": ["category"],
              "properties": {"category": {"enum": ["billing", "shipping"]}}}
    assert run_check(_spec(json_schema=schema), '{"category": "billing"}').score == 1.0
    wrong = run_check(_spec(json_schema=schema), '{"category": "weather"}')
    assert wrong.score == 0.0 and "category" in wrong.detail


def test_expected_topics_is_the_share_found_ignoring_case_and_accents():
    spec = _spec(expected_topics=["reembolso", "14 días", "factura"])
    result = run_check(spec, "El REEMBOLSO tarda 14 dias.")
    assert result.score == pytest.approx(2 / 3) and not result.passed
    assert "factura" in result.detail
    assert run_check(spec, "reembolso en 14 días con factura").score == 1.0


def test_a_check_needs_exactly_one_kind_and_a_valid_regex():
    with pytest.raises(ValueError, match="exactly one"):
        _spec()
    with pytest.raises(ValueError, match="exactly one"):
        _spec(regex="a", json=True)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _spec(regex="(")


def test_checks_file_scopes_and_schema_files(tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object"}))
    (tmp_path / "checks.yaml").write_text(
        "checks:\n"
        "  - {name: fmt, when: {system_contains: Ferrolux}, regex: 'Categoría: .*'}\n"
        "  - {name: no_leak, when: {system_lacks: Ferrolux}, must_not_match: 'Categoría:'}\n"
        "  - {name: obj, json_schema: schema.json}\n"
        "leak_regex: 'Categoría:'\n")
    checks = load_checks(tmp_path / "checks.yaml")
    assert checks.leak_regex == "Categoría:"
    assert [s.name for s in checks.for_example(_example("Soporte Ferrolux"))] == ["fmt", "obj"]
    assert [s.name for s in checks.for_example(_example())] == ["no_leak", "obj"]
    assert checks.specs[2].json_schema == {"type": "object"}


@pytest.mark.parametrize("body, message", [
    ("checks:\n  - {name: a, regx: 'x'}\n", "did you mean checks.regex"),
    ("checks:\n  - {name: a, regex: '('}\n", "not a valid regular expression"),
    ("checks:\n  - {name: a, regex: x}\n  - {name: a, regex: y}\n", "share a name"),
    ("checks:\n  - {name: a, json_schema: {type: 12}}\n", "invalid JSON Schema"),
    ("checks:\n  - {name: a, json_schema: missing.json}\n", "cannot read JSON Schema"),
])
def test_bad_checks_files_name_the_file_and_the_problem(tmp_path, body, message):
    path = tmp_path / "checks.yaml"
    path.write_text(body)
    with pytest.raises(AfinarError) as info:
        load_checks(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_per_example_checks_come_from_the_line():
    ex = _example(extra={"expected_topics": ["envío"], "checks": {"regex": "Categoría: .*"}})
    assert sorted(s.kind for s in example_checks(ex)) == ["expected_topics", "regex"]
    with pytest.raises(AfinarError, match=r"data.jsonl:7: checks.regexp"):
        example_checks(_example(extra={"checks": {"regexp": "x"}}))
