"""`afinar data convert | dedupe | split`: real files in, validated files out, located errors,
nothing written on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afinar.cli import app
from afinar.data.validate import load_examples

runner = CliRunner(env={"COLUMNS": "400"})  # rich wraps at the terminal width
ROOT = Path(__file__).resolve().parents[2]
FAQ = ROOT / "examples" / "faq-tienda"


def _run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_bundled_faq_csv_becomes_chat_data_with_a_system_prompt(tmp_path):
    out = tmp_path / "faq.jsonl"
    result = _run("data", "convert", str(FAQ / "faq.csv"), "-o", str(out),
                  "--system", "Eres el asistente de Nube Verde.")
    assert result.exit_code == 0, result.output
    records = _records(out)
    assert len(records) == 24
    first = records[0]["messages"]
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[1]["content"] == "¿Cuánto tarda en llegar mi pedido?"
    assert first[2]["content"].startswith("Los pedidos llegan en 2 a 4 días")
    assert "4,90 €" in records[1]["messages"][2]["content"]  # quoted commas stay in the cell
    assert load_examples(out).ok


def test_the_bundled_markdown_faq_headings_and_bold_lines_are_questions(tmp_path):
    out = tmp_path / "faq.jsonl"
    assert _run("data", "convert", str(FAQ / "faq.md"), "-o", str(out)).exit_code == 0
    records = _records(out)
    questions = [r["messages"][0]["content"] for r in records]
    assert len(records) == 16
    assert "Pedidos y envíos" not in questions  # a section title without text is no question
    assert "¿Puedo añadir algo a un pedido ya hecho?" in questions  # a bold line
    answers = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in records}
    assert answers["¿Cada cuánto riego un cactus?"].startswith("Cada 3 o 4 semanas")


def test_markdown_q_and_a_prefixes_are_removed(tmp_path):
    md = tmp_path / "faq.md"
    md.write_text("**P: ¿Abrís en agosto?**\nR: Sí, todo el mes.\n\n"
                  "## ¿Y en Navidad?\nSolo el 24 por la mañana.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert _run("data", "convert", str(md), "-o", str(out), "--to", "prompt_completion"
                ).exit_code == 0
    assert _records(out) == [
        {"prompt": "¿Abrís en agosto?", "completion": "Sí, todo el mes."},
        {"prompt": "¿Y en Navidad?", "completion": "Solo el 24 por la mañana."}]


def test_csv_columns_by_flag_semicolons_and_located_errors(tmp_path):
    table = tmp_path / "export.csv"
    table.write_text("id;tema;texto_cliente;texto_agente\n1;envío;¿Dónde está?;En camino.\n"
                     "2;pago;;Aceptamos tarjeta.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    guessed = _run("data", "convert", str(table), "-o", str(out))
    assert guessed.exit_code == 1 and "which column holds the questions?" in guessed.output
    assert "texto_cliente" in guessed.output  # the columns are listed
    flagged = _run("data", "convert", str(table), "-o", str(out), "--question", "texto_cliente",
                   "--answer", "texto_agente")
    assert flagged.exit_code == 1
    assert "export.csv:3: texto_cliente: is empty" in flagged.output
    assert not out.exists()  # nothing half-done


def test_xlsx_sheets_are_read(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")  # in the dev extra; afinar[xlsx] for users
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "FAQ"
    sheet.append(["Question", "Answer"])
    sheet.append(["Do you ship to Portugal?", "Yes, in 3 to 5 working days."])
    sheet.append(["Can I pay by card?", "Yes."])
    book.save(tmp_path / "faq.xlsx")
    out = tmp_path / "out.jsonl"
    assert _run("data", "convert", str(tmp_path / "faq.xlsx"), "-o", str(out), "--sheet", "FAQ"
                ).exit_code == 0
    assert _records(out)[1] == {"messages": [{"role": "user", "content": "Can I pay by card?"},
                                             {"role": "assistant", "content": "Yes."}]}
    missing = _run("data", "convert", str(tmp_path / "faq.xlsx"), "-o", str(out), "--force",
                   "--sheet", "Hoja1")
    assert missing.exit_code == 1 and "sheets: FAQ" in missing.output


def test_jsonl_formats_convert_both_ways_and_refuse_what_cannot_be_said(tmp_path):
    chat = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "x"}, {"role": "assistant",
                 "content": "y"}, {"role": "user", "content": "z"},
                 {"role": "assistant", "content": "w"}]})
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    share = tmp_path / "share.jsonl"
    assert _run("data", "convert", str(chat), "-o", str(share), "--to", "sharegpt"
                ).exit_code == 0
    back = tmp_path / "back.jsonl"
    assert _run("data", "convert", str(share), "-o", str(back)).exit_code == 0
    assert _records(back) == rows  # chat → sharegpt → chat is lossless
    alpaca = _run("data", "convert", str(chat), "-o", str(tmp_path / "a.jsonl"), "--to", "alpaca")
    assert alpaca.exit_code == 1
    assert "chat.jsonl:4:" in alpaca.output and "write it as chat" in alpaca.output
    pairs = _run("data", "convert", str(chat), "-o", str(tmp_path / "p.jsonl"), "--to", "dpo")
    assert pairs.exit_code == 1 and "needs a chosen and a rejected answer" in pairs.output
    assert _run("data", "convert", str(chat), "-o", str(chat), "--to", "chat").exit_code == 1


def test_preference_formats_convert_into_each_other(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": f"bien {i}",
                                         "rejected": f"mal {i}"}) + "\n" for i in range(3)),
                     encoding="utf-8")
    dpo = tmp_path / "dpo.jsonl"
    assert _run("data", "convert", str(pairs), "-o", str(dpo), "--to", "dpo").exit_code == 0
    first = _records(dpo)[0]
    assert first["input"]["messages"] == [{"role": "user", "content": "p0"}]
    assert first["preferred_output"][0]["content"] == "bien 0"
    assert load_examples(dpo, check_size=False).format == "dpo"


def test_dedupe_drops_exact_and_near_duplicates_keeping_lines_as_written(tmp_path):
    data = tmp_path / "d.jsonl"
    lines = [
        {"messages": [{"role": "user", "content": "¿Cuánto cuesta el envío?"},
                      {"role": "assistant", "content": "4,90 €, gratis desde 50 €."}]},
        {"messages": [{"role": "user", "content": "¿Qué pagos aceptáis?"},
                      {"role": "assistant", "content": "Tarjeta y Bizum."}]},
        {"messages": [{"role": "user", "content": "¿Cuánto  cuesta el envío?"},
                      {"role": "assistant", "content": "4,90 €, gratis desde 50 €."}]},
        {"messages": [{"role": "user", "content": "¿Cuánto cuesta el envio?"},
                      {"role": "assistant", "content": "4,90 €, gratis desde 50€."}]},
        {"messages": [{"role": "user", "content": "¿Abrís el domingo?"},
                      {"role": "assistant", "content": "No."}]},
    ]
    text = "".join(json.dumps(r, ensure_ascii=False, indent=None) + "\n" for r in lines)
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "clean.jsonl"
    result = _run("data", "dedupe", str(data), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "line 1 kept; dropped: 3 (exact), 4 (9" in result.output
    assert out.read_text(encoding="utf-8").splitlines() == [text.splitlines()[i] for i in (0, 1, 4)]
    exact = _run("data", "dedupe", str(data), "--threshold", "1", "--dry-run")
    assert "1 duplicate(s) in 1 group(s)" in exact.output
    by_prompt = _run("data", "dedupe", str(data), "--by", "prompt", "--dry-run")
    assert "2 duplicate(s)" in by_prompt.output


def test_split_writes_what_train_would_hold_out(tmp_path):
    from afinar.data.split import split_examples

    data = tmp_path / "d.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = _run("data", "split", str(data), "--held-out", "0.25", "--seed", "7")
    assert result.exit_code == 0, result.output
    train, held = split_examples(load_examples(data).examples, 0.25, 7)
    held_file = tmp_path / "d.held-out.jsonl"
    assert [r["messages"][0]["content"] for r in _records(held_file)] == [
        ex.messages[0].content for ex in sorted(held, key=lambda e: e.line)]
    assert len(_records(tmp_path / "d.train.jsonl")) == len(train) == 15
    again = _run("data", "split", str(data))
    assert again.exit_code == 1 and "already exists" in again.output
