"""The data report's consistency checks point at the lines that break the data set's own
pattern, and the recall advice fires on fact-laden prose, not on a format-teaching set."""

from __future__ import annotations

import json
from pathlib import Path

from afinar.data.consistency import check_consistency
from afinar.data.convert import convert
from afinar.data.example import Example, Message
from afinar.data.validate import load_examples

ROOT = Path(__file__).resolve().parents[2]


def _chat(question: str, answer: str, line: int) -> Example:
    return Example((Message("user", question), Message("assistant", answer, True)), line=line)


def _formatted(i: int) -> str:
    return f"Categoría: envío\nPrioridad: alta\nRespuesta: el pedido {i} sale hoy."


def test_length_outliers_and_format_breakers_are_located():
    examples = [_chat(f"pedido {i} roto", _formatted(i), i + 1) for i in range(12)]
    examples.append(_chat("pedido 12 roto", "Lo sentimos mucho, " * 40, 13))  # rambling prose
    examples.append(_chat("pedido 13 roto", "Categoría: envío", 14))
    found = check_consistency(examples, "d.jsonl")
    text = [str(i) for i in found["issues"]]
    assert any("1 answer(s) far longer than the rest" in t and "lines 13" in t for t in text), text
    assert any("2 answer(s) break the format 86% of answers share" in t and "lines 13, 14" in t
               for t in text), text
    assert found["stats"]["dominant_answer_shape"] == "Categoría: / Prioridad: / Respuesta:"
    assert all(i.severity == "warning" for i in found["issues"])


def test_near_identical_questions_with_different_answers_are_contradictions():
    examples = [_chat(f"¿Abrís el día {i}?", f"Sí, de 9 a {12 + i % 5}.", i + 1)
                for i in range(10)]
    examples.append(_chat("¿Abrís el día 3 ?", "No, ese día cerramos por inventario.", 11))
    found = check_consistency(examples, "d.jsonl")
    assert found["stats"]["near_contradictions"] == 1
    assert [str(i) for i in found["issues"]] == [
        "d.jsonl:4: answer: contradicts line 11: the same question (or nearly) with a different "
        "answer (hint: keep one answer per question; contradictions teach noise)"]


def test_recall_advice_on_a_faq_but_not_on_a_format_teaching_set():
    faq = convert(ROOT / "examples" / "faq-tienda" / "faq.csv").examples
    advice = check_consistency(faq)["advice"]
    assert len(advice) == 1 and "retrieval (RAG)" in advice[0] and "--baseline fewshot" in advice[0]
    triage = load_examples(ROOT / "examples" / "soporte-triaje" / "data.jsonl").examples
    assert check_consistency(triage)["advice"] == []


def test_validate_shows_the_checks_and_the_advice(tmp_path):
    from typer.testing import CliRunner

    from afinar.cli import app

    data = tmp_path / "faq.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": ex.messages[0].content},
        {"role": "assistant", "content": ex.messages[1].content}]}, ensure_ascii=False) + "\n"
        for ex in convert(ROOT / "examples" / "faq-tienda" / "faq.csv").examples),
        encoding="utf-8")
    result = CliRunner(env={"COLUMNS": "400"}).invoke(app, ["validate", str(data), "--no-tokens",
                                                            "--json"])
    report = json.loads(result.output)
    assert report["stats"]["consistency"]["looks_like_recall"] is True
    assert report["stats"]["advice"] and result.exit_code == 0
