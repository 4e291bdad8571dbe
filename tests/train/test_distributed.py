"""Two processes (torchrun, gloo on CPU) train exactly like one process accumulating the same
micro-batches: gradient sync and token normalisation across processes are right."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from afinar import rundir

pytestmark = pytest.mark.slow
COMMON = ["max_steps=6", "batch_size=2", "precision=fp32", "learning_rate=0.01", "seed=5",
          "eval_steps=3"]


def _sets(extra):
    return [x for s in COMMON + extra for x in ("--set", s)]


def _pairs(folder: Path) -> Path:
    from conftest import write_jsonl

    return write_jsonl(folder / "pairs.jsonl", [
        {"prompt": f"pedido {i} llegó roto", "chosen": f"Prioridad: alta {i}",
         "rejected": f"lo siento {'mucho ' * (i % 3)}{i}"} for i in range(40)])


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, tiny_model_dir,
                                                           small_chat_file, method):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = small_chat_file if method == "sft" else _pairs(tmp_path)
    base = ["--data", str(data), "--model", str(tiny_model_dir), "--method", method]
    torchrun = str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--nproc_per_node=2", "-m", "afinar.cli", "train", *base,
                          "--output", str(tmp_path / "ddp"), *_sets([])],
                         env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("done ") == 1  # only rank 0 reports
    single = subprocess.run([sys.executable, "-m", "afinar.cli", "train", *base, "--output",
                             str(tmp_path / "one"), *_sets(["gradient_accumulation_steps=2"])],
                            env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    a = load_file(tmp_path / "ddp" / rundir.ADAPTER_DIR / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / rundir.ADAPTER_DIR / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for name, t in a.items() if "lora_B" in name)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
