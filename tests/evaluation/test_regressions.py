"""The "what did it break" comparison and the taught-format signature."""

from __future__ import annotations

import re

from afinar.evaluation.regressions import compare_probes, format_signature, load_probes

TICKET = "Categoría: envío\nPrioridad: alta\nRespuesta: Lo revisamos."


def test_bundled_probes_are_bilingual_and_mostly_checked():
    probes = load_probes()
    assert len(probes) >= 20
    assert {p.extra["language"] for p in probes} == {"es", "en"}
    assert sum("checks" in p.extra for p in probes) >= 15


def test_signature_from_labelled_references_or_explicit():
    refs = [TICKET] * 6 + ["París es la capital de Francia."] * 4
    sig = format_signature(refs)
    assert re.search(sig, "Hola\nCategoría: cuenta") and not re.search(sig, "La categoría es x")
    assert format_signature(["Just prose.", "More prose: with a colon mid-line."]) is None
    assert format_signature(refs, explicit="XYZ") == "XYZ"


def test_compare_counts_changes_leaks_and_check_rates():
    probes = load_probes()[:3]  # 7+5=12, 9*3=27, 15-6=9: expected_topics checks
    base = ["12", "It is 27.", "Son 9."]
    tuned = ["12", "Categoría: cuenta\nPrioridad: baja\nRespuesta: 27", "Son 8."]
    out = compare_probes(probes, tuned, base, format_signature([TICKET]))
    s = out["summary"]
    assert (s["prompts"], s["identical"], s["changed"]) == (3, 1, 2)
    assert (s["model_leaks"], s["baseline_leaks"]) == (1, 0)
    assert s["baseline_checks_pass_rate"] == 1.0
    assert abs(s["model_checks_pass_rate"] - 2 / 3) < 1e-9
    assert any("leaks into unrelated prompts" in w for w in out["warnings"])
    assert any("general skills dropped" in w for w in out["warnings"])
