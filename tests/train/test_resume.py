"""kill -9 in the middle of an epoch, resume, and end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from afinar import rundir

pytestmark = pytest.mark.slow

SETTINGS = ["max_steps=60", "batch_size=2", "eval_steps=7", "save_steps=1", "seed=3",
            "learning_rate=0.01", "lora.dropout=0.1",  # dropout: the RNG state must be restored
            "precision=fp32", "epochs=10", "early_stopping_patience=null"]


def _cmd(*args):
    return [sys.executable, "-m", "afinar.cli", "train", *args]


def _args(data, model, out):
    return ["--data", str(data), "--model", str(model), "--output", str(out)] + [
        x for s in SETTINGS for x in ("--set", s)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_resume_after_kill_matches_uninterrupted_run(tmp_path, tiny_model_dir, small_chat_file):
    full = tmp_path / "uninterrupted"
    subprocess.run(_cmd(*_args(small_chat_file, tiny_model_dir, full)), check=True, env=_env(),
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(*_args(small_chat_file, tiny_model_dir, killed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed / rundir.CHECKPOINTS_DIR
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name[5:]) for p in checkpoints.glob("step-*")] if checkpoints.is_dir() else []
        if steps and max(steps) >= 15:  # epoch 1 has 16 steps: this is mid-epoch
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((killed / rundir.RUN_FILE).read_text())["status"] == "running"
    assert not (killed / rundir.ADAPTER_DIR).exists()

    resumed = subprocess.run(_cmd("--resume", str(killed)), env=_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    a = load_file(full / rundir.ADAPTER_DIR / "adapter_model.safetensors")
    b = load_file(killed / rundir.ADAPTER_DIR / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)

    def losses(run):
        rows = [json.loads(l) for l in (run / rundir.METRICS_FILE).read_text().splitlines()]
        return [(r["step"], round(r.get("train_loss", r.get("eval_loss")), 5)) for r in rows]

    assert losses(full) == losses(killed)  # same data order, same numbers, no duplicated lines


def test_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    from afinar.train.metrics import Metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1}\n{"type": "eval", "step": 2}\n'
                    '{"type": "train", "step": 3}\n{"type": "tra')
    Metrics(path, True, keep_until_step=2)
    assert path.read_text() == '{"type": "train", "step": 1}\n{"type": "eval", "step": 2}\n'
