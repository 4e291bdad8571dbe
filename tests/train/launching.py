"""Shared by test_fsdp.py and test_deepspeed.py: `accelerate launch` with a shipped config
(configs/accelerate/) running `afinar train` on the tiny model, and what its run wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from afinar import rundir

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
# lr constant: a 3-step run resumed to 6 steps has the same schedule as a 6-step run;
# dropout: each process's RNG state must be restored, not only rank 0's.
COMMON = ["batch_size=2", "precision=fp32", "learning_rate=0.01", "seed=5", "eval_steps=3",
          "lr_scheduler=constant", "warmup_ratio=0", "lora.dropout=0.1", "keep_checkpoints=3"]


def _free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold accelerate's 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *args, processes: int = 2) -> subprocess.CompletedProcess:
    """accelerate launch --config_file configs/accelerate/CONFIG -m afinar.cli train ARGS."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([accelerate, "launch", "--config_file", str(CONFIGS / config),
                           "--num_processes", str(processes), "--main_process_port",
                           str(_free_port()), "-m", "afinar.cli", "train", "--no-eval", *args],
                          env=env, capture_output=True, text=True, timeout=600)


def launch_train(config: str, data, model, out, settings: list, processes: int = 2):
    done = launch(config, "--data", str(data), "--model", str(model), "--output", str(out),
                  *[x for s in settings for x in ("--set", s)], processes=processes)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(run: Path) -> list:
    rows = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    return [(r["type"], r["step"], round(r.get("train_loss", r.get("eval_loss")), 6))
            for r in rows]


def adapter(run: Path) -> dict:
    return load_file(run / rundir.ADAPTER_DIR / "adapter_model.safetensors")
