"""The bundled Spanish FAQ (a CSV and a Markdown document) through the whole path a user takes:
`afinar data convert` → `afinar validate` → `afinar train` → `afinar eval`, with the CLI, on the
tiny model (a few steps: the plumbing, not the quality)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from afinar.cli import app

FAQ = Path(__file__).resolve().parents[2] / "examples" / "faq-tienda"
SYSTEM = "Eres el asistente de Nube Verde, una tienda online de plantas."
runner = CliRunner(env={"COLUMNS": "400"})


def _cli(*args: str):
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def test_csv_and_markdown_faq_convert_validate_train_and_evaluate(tmp_path, tiny_model_dir):
    csv_out, md_out = tmp_path / "csv.jsonl", tmp_path / "md.jsonl"
    _cli("data", "convert", str(FAQ / "faq.csv"), "-o", str(csv_out), "--system", SYSTEM)
    _cli("data", "convert", str(FAQ / "faq.md"), "-o", str(md_out), "--system", SYSTEM)
    both = tmp_path / "faq.jsonl"
    both.write_text(csv_out.read_text(encoding="utf-8") + md_out.read_text(encoding="utf-8"),
                    encoding="utf-8")

    report = json.loads(_cli("validate", str(both), "--model", str(tiny_model_dir),
                             "--json").output)
    assert report["ok"] and report["examples"] == 40
    assert report["stats"]["advice"], "a FAQ is facts to recall: the report says so"

    run = tmp_path / "run"
    _cli("train", "--data", str(both), "--model", str(tiny_model_dir), "--output", str(run),
         "--set", "max_steps=6", "--set", "batch_size=4", "--set", "precision=fp32",
         "--set", "evaluate=false")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "succeeded" and info["summary"]["steps"] == 6

    _cli("eval", str(run), "--no-probes")
    evaluated = json.loads((run / "report.json").read_text())
    assert evaluated["data"]["examples"] == 8  # 20% of 40 held out
    assert all(row["prompt"][0]["content"] == SYSTEM for row in evaluated["examples"])
    assert {m["name"] for m in evaluated["metrics"]} >= {"eval_loss", "rouge_l"}
