"""The accelerate `Accelerator` for one training run, whatever ran before it in the process.

    accelerator = make_accelerator(device, "bf16")

accelerate keeps one process-wide `AcceleratorState`: once a run has built an Accelerator with
one mixed precision, a second one asking for another raises "AcceleratorState has already been
initialized and cannot be changed". `train()` must run any number of times in one process (a
notebook, the serve worker running queued jobs one after another, the test suite), each with the
precision its own config picks, so the precision part of that state is reset between runs. The
process part (`PartialState`: ranks, the process group under torchrun) is kept: it is the same
for every run of a process and tearing it down would break multi-process runs.

FSDP and DeepSpeed launches (`accelerate launch --config_file ...`) are checked here, before any
weights are loaded (train/sharding.py).
"""

from __future__ import annotations

import torch

from afinar.train import sharding

# afinar's precision names -> accelerate's mixed_precision values
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def make_accelerator(device: torch.device, precision: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    mixed = MIXED_PRECISION[precision]
    state = AcceleratorState._shared_state  # accelerate==1.15.0 is pinned: private but stable
    if state:
        wrong_device = device.type == "cpu" and state.get("device") is not None \
            and state["device"].type != "cpu"
        if state.get("_mixed_precision") != mixed or wrong_device:
            # One process alone can rebuild its process state too (e.g. a CPU run after a GPU
            # one); under torchrun the process group stays.
            single = not (torch.distributed.is_available() and torch.distributed.is_initialized())
            AcceleratorState._reset_state(reset_partial_state=single)
    sharding.check_launch()
    # accelerate ignores a DeepSpeed launch when built with cpu=True; without a GPU it then
    # runs DeepSpeed on CPU (one process).
    accelerator = Accelerator(cpu=device.type == "cpu" and not sharding.deepspeed_requested(),
                              mixed_precision=mixed)
    sharding.check_engine(accelerator)
    return accelerator
