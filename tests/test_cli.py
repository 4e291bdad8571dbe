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


def test_sft_then_dpo_then_chat_and_merged_export(tmp_path, tiny_model_dir, small_chat_file):
    """The README's preference path on a tiny model: validate pairs, SFT, DPO from the SFT run,
    chat, and a merged export holding base + SFT + DPO."""
    import torch
    from transformers import AutoModelForCausalLM

    from afinar import load
    from afinar.export import export
    from conftest import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"pedido {i} llegó roto", "chosen": f"Prioridad: alta {i}",
         "rejected": f"lo siento mucho {i}"} for i in range(16)])
    shown = runner.invoke(app, ["validate", str(pairs), "--model", str(tiny_model_dir)])
    assert shown.exit_code == 0, shown.output
    assert "chosen vs rejected" in " ".join(shown.output.split())
    common = ["--model", str(tiny_model_dir), "--set", "precision=fp32", "--no-eval",
              "--set", "learning_rate=0.01"]
    sft = tmp_path / "sft"
    done = runner.invoke(app, ["train", "--data", str(small_chat_file), "--output", str(sft),
                               "--set", "max_steps=4", *common])
    assert done.exit_code == 0, done.output
    dpo = tmp_path / "dpo"
    common[1] = str(sft)
    done = runner.invoke(app, ["train", "--method", "dpo", "--data", str(pairs), "--output",
                               str(dpo), "--set", "max_steps=4", "--set", "eval_steps=2",
                               *common])
    assert done.exit_code == 0, done.output
    assert "preference accuracy" in done.output and "reference log-probs" in done.output
    assert "objective: dpo" in (dpo / rundir.CONFIG_FILE).read_text()
    wrong = runner.invoke(app, ["train", "--method", "ppo", "--data", str(pairs)])
    assert wrong.exit_code == 1 and "expected sft, dpo or orpo" in " ".join(wrong.output.split())

    chat = subprocess.run([AFINAR, "chat", str(dpo), "--max-tokens", "5"], input="hola\n/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0 and "Traceback" not in chat.stderr, chat.stderr
    result = export(str(dpo), to="merged", output=str(tmp_path / "merged"), prompts=2)
    assert result.verification.summary()["passed"]
    merged = AutoModelForCausalLM.from_pretrained(result.output).eval()
    trained, sft_only = load(str(dpo)), load(str(sft))
    ids = torch.tensor([trained.prompt_ids([{"role": "user", "content": "pedido 7 llegó roto"}])])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, trained.model(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, sft_only.model(ids).logits, atol=1e-4)
