"""Whole training runs on a tiny random Llama: files written, loss falls, weights change."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import afinar
from afinar import rundir
from afinar.config import TrainConfig
from afinar.errors import AfinarError
from afinar.infer.generate import GenerationSettings, generate_file
from afinar.train.recipe import train


def _config(data, model_dir, out, **kw):
    base = dict(data=str(data), model=str(model_dir), output=str(out), learning_rate=1e-2,
                batch_size=4, max_steps=30, eval_steps=10, seed=0, precision="fp32")
    return TrainConfig(**{**base, **kw})


def _metrics(run):
    return [json.loads(l) for l in (run / rundir.METRICS_FILE).read_text().splitlines()]


def test_lora_run_learns_and_writes_everything(tmp_path, tiny_model_dir, small_chat_file):
    events = []
    result = train(_config(small_chat_file, tiny_model_dir, tmp_path / "run"),
                   on_event=events.append)
    run = result.run_dir
    for name in (rundir.RUN_FILE, rundir.CONFIG_FILE, rundir.DATA_REPORT, rundir.METRICS_FILE):
        assert (run / name).is_file(), name
    assert (run / rundir.TOKENIZER_DIR / "tokenizer.json").is_file()
    assert (run / rundir.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    info = json.loads((run / rundir.RUN_FILE).read_text())
    assert info["status"] == "succeeded" and info["summary"]["steps"] == 30

    records = _metrics(run)
    train_losses = [r["train_loss"] for r in records if r["type"] == "train"]
    evals = [r["eval_loss"] for r in records if r["type"] == "eval"]
    assert len(train_losses) == 30 and evals[0] > 0
    # A random 2-layer model learns slowly with LoRA (measured: 6.46 -> ~5.6 in 30 steps).
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.4
    assert min(evals) < evals[0] - 0.4  # held-out loss at step 0 is the base model's
    assert {"step", "eval", "start", "end"} <= {e["type"] for e in events}

    adapter = load_file(run / rundir.ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it trained

    model = afinar.load(str(run))
    answers = model.generate([[{"role": "user", "content": "pedido 99 llegó roto"}]],
                             GenerationSettings(max_new_tokens=20))
    assert isinstance(answers[0], str) and answers[0]


def test_full_fine_tune_changes_base_weights(tmp_path, tiny_model_dir, small_chat_file):
    result = train(_config(small_chat_file, tiny_model_dir, tmp_path / "full", method="full",
                           learning_rate=1e-3, max_steps=4))
    weights = result.run_dir / rundir.FULL_MODEL_DIR / "model.safetensors"
    assert weights.is_file()
    tuned = load_file(weights)
    base = load_file(tiny_model_dir / "model.safetensors")
    changed = [k for k in base if k in tuned and not torch.equal(base[k], tuned[k])]
    assert len(changed) > len(base) // 2
    assert afinar.load(str(result.run_dir)).generate([[{"role": "user", "content": "hola"}]],
                                                     GenerationSettings(max_new_tokens=3))


def test_dora_and_gradient_accumulation_run(tmp_path, tiny_model_dir, small_chat_file):
    result = train(_config(small_chat_file, tiny_model_dir, tmp_path / "dora",
                           lora={"dora": True, "r": 4}, gradient_accumulation_steps=2,
                           batch_size=2, max_steps=3))
    config = json.loads((result.run_dir / rundir.ADAPTER_DIR / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4


def test_early_stopping_keeps_best(tmp_path, tiny_model_dir, small_chat_file):
    # A huge learning rate makes held-out loss get worse: training must stop and keep the best.
    result = train(_config(small_chat_file, tiny_model_dir, tmp_path / "es", learning_rate=3.0,
                           max_steps=40, eval_steps=2, early_stopping_patience=2,
                           max_grad_norm=None))
    s = result.summary
    assert s["stopped_early"] and s["steps"] < 40
    evals = [r for r in _metrics(result.run_dir) if r["type"] == "eval"]
    assert s["best_eval_loss"] == min(r["eval_loss"] for r in evals)


def test_refuses_to_overwrite_a_run(tmp_path, tiny_model_dir, small_chat_file):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(AfinarError, match="not empty"):
        train(_config(small_chat_file, tiny_model_dir, out))


def test_generate_file_drops_trailing_answer_and_writes_atomically(tmp_path, tiny_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "hola"},
                                            {"role": "assistant", "content": "vieja"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "adiós"}]}) + "\n")
    dest = tmp_path / "out" / "answers.jsonl"
    n = generate_file(afinar.load(str(tiny_model_dir)), str(src), str(dest),
                      GenerationSettings(max_new_tokens=5))
    rows = [json.loads(l) for l in dest.read_text().splitlines()]
    assert n == 2 and len(rows) == 2
    assert rows[0]["messages"][-1]["role"] == "assistant"
    assert rows[0]["reference"] == "vieja" and len(rows[0]["messages"]) == 2
    assert [p.name for p in dest.parent.iterdir()] == ["answers.jsonl"]  # no temp left
