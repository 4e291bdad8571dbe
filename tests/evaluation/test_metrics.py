"""Reference metrics on hand-made answers whose scores are known."""

from __future__ import annotations

import pytest

from afinar.evaluation.metrics import (exact_match, normalize, normalized_match, rouge_l,
                                     score_answer)


def test_exact_match_is_one_only_for_the_same_text():
    assert exact_match("Madrid", "Madrid") == 1.0
    assert exact_match("  Madrid\n", "Madrid") == 1.0  # surrounding whitespace is not content
    assert exact_match("madrid", "Madrid") == 0.0
    assert exact_match("Madrid.", "Madrid") == 0.0


def test_normalized_match_ignores_case_accents_punctuation_and_spacing():
    assert normalize("  ¡Categoría:   ENVÍO!  ") == "categoria: envio"
    assert normalized_match("categoria: envio.", "Categoría:  Envío") == 1.0
    assert normalized_match("Categoría: cuenta", "Categoría: envío") == 0.0


@pytest.mark.parametrize("answer, reference, expected", [
    ("el gato negro", "el gato negro", 1.0),
    ("uno dos tres", "cuatro cinco seis", 0.0),
    # LCS "el negro" = 2 of 3 words on both sides: P = R = F = 2/3
    ("el perro negro", "el gato negro", 2 / 3),
    # LCS 2; P = 2/2, R = 2/4 -> F = 2PR/(P+R) = 2/3
    ("gato negro", "el gato muy negro", 2 / 3),
    ("", "", 1.0),
    ("algo", "", 0.0),
])
def test_rouge_l_known_values(answer, reference, expected):
    assert rouge_l(answer, reference) == pytest.approx(expected)


def test_rouge_l_keeps_non_ascii_words_whole():
    # rouge-score's default tokenizer would split "categoría" into "categor" + "a", making
    # these two different words look half equal.
    assert rouge_l("categoría", "categorizar a") == 0.0
    assert rouge_l("Categoría: envío", "categoría envío") == 1.0


def test_score_answer_reports_every_metric():
    assert score_answer("París", "Paris") == {"exact_match": 0.0, "normalized_match": 1.0,
                                             "rouge_l": 0.0}
