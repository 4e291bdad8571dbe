"""DeepSpeed ZeRO-2 and ZeRO-3 with the shipped accelerate configs, one CPU process (the only
way DeepSpeed runs through accelerate without a GPU): afinar's own gradient accumulation gives
the same weights as without DeepSpeed, and a ZeRO-3 run stopped at step 3 and resumed from
DeepSpeed's checkpoint ends where an uninterrupted run ends. Skipped without `afinar[deepspeed]`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from launching import COMMON, adapter, launch, launch_train, losses

pytest.importorskip("deepspeed", reason="pip install 'afinar[deepspeed]'")
pytestmark = pytest.mark.slow
SETTINGS = [*COMMON, "gradient_accumulation_steps=2"]


def _train(config, data, model, out, max_steps):
    return launch_train(config, data, model, out, SETTINGS + [f"max_steps={max_steps}"],
                        processes=1)


def test_zero2_matches_one_process_and_zero3_resumes(tmp_path, tiny_model_dir, small_chat_file):
    zero2 = tmp_path / "zero2"
    done = _train("deepspeed_zero2.yaml", small_chat_file, tiny_model_dir, zero2, 6)
    assert "DeepSpeed ZeRO-2 over 1 process" in done.stderr
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "afinar.cli", "train", "--no-eval", "--data",
                    str(small_chat_file), "--model", str(tiny_model_dir), "--output", str(plain),
                    *[x for s in SETTINGS + ["max_steps=6"] for x in ("--set", s)]],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    a, b = adapter(zero2), adapter(plain)
    assert a.keys() == b.keys()
    for name in a:  # one optimizer step per accumulated batch, not per micro-batch
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)

    # ZeRO-3 partitions the weights: the adapter and state.pt are gathered; AdamW's state
    # is in DeepSpeed's checkpoint, which resume reads back.
    zero3 = tmp_path / "zero3"
    _train("deepspeed_zero3.yaml", small_chat_file, tiny_model_dir, zero3, 3)
    payload = torch.load(zero3 / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert payload["optimizer"] == {"format": "deepspeed", "tag": "step-000003"}
    assert all(t.numel() > 0 for t in payload["trainable"].values())
    assert (zero3 / "checkpoints" / "deepspeed" / "step-000003").is_dir()
    resumed = launch("deepspeed_zero3.yaml", "--resume", str(zero3), "--set", "max_steps=6",
                      processes=1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "(step 3, epoch 1)" in resumed.stderr
    c = adapter(zero3)
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [(k, s, round(v, 4)) for k, s, v in losses(zero3)] == [
        (k, s, round(v, 4)) for k, s, v in losses(zero2)]


def test_deepspeed_with_several_cpu_processes_is_refused(tmp_path, tiny_model_dir,
                                                         small_chat_file):
    if torch.cuda.is_available():
        pytest.skip("GPU machine: several DeepSpeed processes are supported there")
    done = launch("deepspeed_zero2.yaml", "--data", str(small_chat_file), "--model",
                   str(tiny_model_dir), "--output", str(tmp_path / "run"), processes=2)
    assert done.returncode != 0
    assert "DeepSpeed with 2 processes needs GPUs" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
