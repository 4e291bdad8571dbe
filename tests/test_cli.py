"""The `afinar` command end to end on a tiny model: train, chat, generate, user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from afinar import rundir
from afinar.cli import app

runner = CliRunner()
AFINAR = str(Path(sys.executable).parent / "afinar")


def test_train_chat_generate(tmp_path, tiny_model_dir, small_chat_file):
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--data", str(small_chat_file), "--model",
                                 str(tiny_model_dir), "--output", str(run), "--set", "max_steps=3",
                                 "--set", "precision=fp32"])
    assert result.exit_code == 0, result.output
    assert "done" in result.output and (run / rundir.ADAPTER_DIR).is_dir()
    assert "max_steps: 3" in (run / rundir.CONFIG_FILE).read_text()

    chat = subprocess.run([AFINAR, "chat", str(run), "--max-tokens", "5"],
                          input="hola\n/reset\nadiós\n/exit\n", capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "ready" in chat.stderr and "Traceback" not in chat.stderr

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "pedido 3"}]}) + "\n")
    out = tmp_path / "answers.jsonl"
    result = runner.invoke(app, ["generate", str(run), "-i", str(prompts), "-o", str(out),
                                 "--max-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["messages"][-1]["role"] == "assistant"


def test_user_errors_are_one_clear_message(tmp_path, tiny_model_dir, small_chat_file):
    cases = [
        (["train", "--data", str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir)],
         "no such file"),
        (["train", "--data", str(small_chat_file), "--set", "lora.rank=8"],
         "did you mean lora.r"),
        (["train", "--data", str(small_chat_file), "--set", "batch_size=zero"],
         "batch_size"),
        (["train", "--data", str(small_chat_file), "--model", str(tmp_path / "nope")],
         "not found"),
        (["chat", str(tmp_path)], "neither a Hugging Face model"),
        (["train", "--resume", str(tmp_path)], "not a run directory"),
    ]
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert expected in " ".join(result.output.split()), (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_bad_data_stops_training_with_located_issues(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps({"messages": [{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "a"}]})] * 12
    lines[4] = '{"messages": [{"role": "robot", "content": "x"}]}'
    bad.write_text("\n".join(lines) + "\n")
    result = subprocess.run([AFINAR, "train", "--data", str(bad), "--model", str(tiny_model_dir),
                             "--output", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{bad}:5: messages[0].role: unknown role 'robot'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_validate_reports_the_split(small_chat_file):
    result = runner.invoke(app, ["validate", str(small_chat_file), "--no-tokens", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output)
    assert report["stats"]["split"]["train"] == 32 and report["stats"]["split"]["held_out"] == 8
