"""FSDP2 with the shipped accelerate config, two CPU processes over gloo: a run stopped after 3
steps and resumed with `--resume RUN --set max_steps=6` matches a DDP run straight to 6 steps at
every step, to float rounding (and DDP matches one process: tests/train/test_distributed.py); its
checkpoints hold full tensors.

accelerate routes FSDP only on GPUs; afinar routes it on CPU (train/sharding.py), so the code
path is accelerate's FSDP2 one, the same as on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from afinar import rundir
from launching import COMMON, adapter, launch, launch_train, losses

pytestmark = pytest.mark.slow


def test_fsdp_trains_like_ddp_checkpoints_full_tensors_and_resumes(tmp_path, tiny_model_dir,
                                                                    small_chat_file):
    # FSDP for 3 steps, then resumed to 6; compared with DDP straight to 6 (three launches:
    # each starts three Python processes, most of this test's time).
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    done = launch_train("fsdp.yaml", small_chat_file, tiny_model_dir, fsdp,
                        COMMON + ["max_steps=3"])
    assert "FSDP2 over 2 processes: 3 sharded units" in done.stderr  # 2 decoder layers + root
    assert done.stdout.count("done ") == 1  # only rank 0 reports
    resumed = launch("fsdp.yaml", "--resume", str(fsdp), "--set", "max_steps=6")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "(step 3, epoch 1)" in resumed.stderr
    launch_train("ddp.yaml", small_chat_file, tiny_model_dir, ddp, COMMON + ["max_steps=6"])

    # Same data order, dropout and numbers at every step, before and after the resume. Equal to
    # float rounding, not bit for bit: FSDP's reduce-scatter sums the ranks' gradients in another
    # order than DDP's all-reduce (grad norms part in the 7th digit from step 2; a loss once
    # rounded to 6 decimals on either side of a 5: 5.947939 vs 5.947938, AMX CPU). A wrong data
    # order, dropout mask or restored RNG moves a loss by far more than 1e-6 of itself.
    sharded, replicated = losses(fsdp), losses(ddp)
    assert [(kind, step) for kind, step, _ in sharded] == [(kind, step) for kind, step, _ in
                                                           replicated]
    assert [loss for *_, loss in sharded] == pytest.approx([loss for *_, loss in replicated],
                                                           rel=1e-6, abs=2e-6)
    train = [loss for kind, _, loss in sharded if kind == "train"]
    held = [loss for kind, _, loss in sharded if kind == "eval"]
    assert train[-1] < train[0] and held[-1] < held[0]
    a, b = adapter(fsdp), adapter(ddp)
    assert a.keys() == b.keys()
    assert any(t.abs().sum() > 0 for name, t in a.items() if "lora_B" in name)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)

    # The checkpoint holds whole tensors (not one process's shards), the adapter's shapes.
    payload = torch.load(fsdp / rundir.CHECKPOINTS_DIR / "step-000006" / "state.pt",
                         weights_only=False)
    weights = payload["trainable"]
    assert {n.replace(".default", "") for n in weights} == set(a)
    assert all(weights[n].shape == a[n.replace(".default", "")].shape for n in weights)
    optimizer = payload["optimizer"]["state"]["state"]
    assert len(optimizer) == len(weights)
    for name, tensor in weights.items():
        assert optimizer[f"model.{name}"]["exp_avg"].shape == tensor.shape
    assert len(payload["rng_ranks"]) == 2

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(fsdp / rundir.ADAPTER_DIR))
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_" in n) == sum(
        t.numel() for t in a.values())


def test_fsdp_version_1_is_refused_before_the_accelerator_is_built(monkeypatch):
    from afinar.errors import AfinarError
    from afinar.train import sharding

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")  # what `accelerate launch` sets for fsdp_version: 1
    with pytest.raises(AfinarError, match="FSDP version 1 is not supported"):
        sharding.check_launch()
    monkeypatch.setenv("FSDP_VERSION", "2")
    sharding.check_launch()
