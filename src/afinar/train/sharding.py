"""What the training loop does differently when the model is sharded (FSDP2, DeepSpeed ZeRO).

    accelerate launch --config_file configs/accelerate/fsdp.yaml -m afinar.cli train ...

accelerate picks the engine from its config (`ACCELERATE_USE_FSDP` / `ACCELERATE_USE_DEEPSPEED`,
set by `accelerate launch`); `check_launch` and `check_engine` (called by `make_accelerator`)
adjust it and refuse what afinar cannot run, before any weights are loaded. The loop then calls
this module at five places: `prepare`, `accumulating` (one micro-batch), `gather_checkpoint`,
`restore` and `full_weights`. For one process and DDP each does what the loop did before, plus
one thing: a multi-process checkpoint keeps every process's RNG state, not only rank 0's.

Checkpoints stay one `state.pt` per step written by rank 0: under FSDP every process hands over its
shards and rank 0 writes full tensors (trainable weights and AdamW state, keyed by parameter
name), which resume re-shards, so a checkpoint is independent of how it was sharded. DeepSpeed
partitions the optimizer in its own format; its state is saved with DeepSpeed's own checkpoint
(`checkpoints/deepspeed/<tag>`, one file per rank, resumed with the same number of processes),
while the trained weights are still gathered into `state.pt` and the adapter.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from afinar.errors import AfinarError
from afinar.models import adapters
from afinar.train import state as ckpt

_DEEPSPEED_DIR = "deepspeed"  # under checkpoints/: DeepSpeed's own checkpoint, one tag per step


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def deepspeed_requested() -> bool:
    """`accelerate launch` with a DeepSpeed config sets this; accelerate only honours it when
    the Accelerator is not built with cpu=True, so make_accelerator asks first."""
    return _flag("ACCELERATE_USE_DEEPSPEED")


def sharded_launch() -> bool:
    """An accelerate launch that asks for FSDP or DeepSpeed (known before the Accelerator)."""
    return deepspeed_requested() or _flag("ACCELERATE_USE_FSDP")


def engine(accelerator) -> str | None:
    """"fsdp", "deepspeed", or None for one process and DDP (whole model on every process)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return None


def check_launch() -> None:
    """Before the Accelerator is built (accelerate's FSDP1 plugin fails on CPU with a message
    about devices): FSDP1, and DeepSpeed when it is not installed, are refused."""
    if deepspeed_requested() and importlib.util.find_spec("deepspeed") is None:
        raise AfinarError("the accelerate config asks for DeepSpeed, which is not installed",
                          'pip install "afinar[deepspeed]"')
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise AfinarError(
            "FSDP version 1 is not supported: afinar trains with FSDP2 (torch's fully_shard), "
            "which keeps frozen and LoRA weights in one sharded unit and takes the optimizer "
            "built before wrapping",
            "set `fsdp_version: 2` under fsdp_config in your accelerate config (FSDP_VERSION=2 "
            "under torchrun), or use configs/accelerate/fsdp.yaml")


def check_engine(accelerator) -> None:
    """Right after the Accelerator is built. FSDP on CPU processes is routed by hand (accelerate
    only routes FSDP on accelerators); multi-process DeepSpeed on CPU is refused."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (_flag("ACCELERATE_USE_FSDP") and accelerator.device.type == "cpu"
            and accelerator.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP)
            and getattr(accelerator.state, "fsdp_plugin", None) is None):
        # accelerate==1.15.0 (pinned) picks FSDP only for GPU-like devices; on CPU it would
        # silently run DDP. torch's fully_shard itself runs on CPU over gloo, and accelerate's
        # FSDP2 code path is device-agnostic, so the state is set as accelerate would on a GPU.
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* from the launcher's environment
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        for shared in (AcceleratorState._shared_state, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if engine(accelerator) == "deepspeed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if accelerator.num_processes != world:
            # Without a GPU, accelerate sets up no process group of its own and counts one
            # process, while DeepSpeed's launcher started `world` of them: every process would
            # train on all the data as if alone.
            raise AfinarError(
                f"DeepSpeed with {world} processes needs GPUs: on CPU, accelerate 1.15 counts "
                f"{accelerator.num_processes} process (DeepSpeed runs on CPU in one process "
                "only)",
                "on CPU use one process (--num_processes 1), or FSDP / DDP for several")


def prepare(accelerator, loss_model, optimizer, config, say):
    """accelerate.prepare, after telling the engine what afinar already decides itself."""
    kind = engine(accelerator)
    if kind == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        inner = loss_model.model
        base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
        if plugin.transformer_cls_names_to_wrap is None:
            # accelerate reads `_no_split_modules` from the module it wraps; afinar wraps its
            # SupervisedLoss, so the decoder layer class comes from the model inside it. Without
            # it every weight lands in one unit, gathered whole at each forward.
            plugin.transformer_cls_names_to_wrap = list(getattr(base, "_no_split_modules", None)
                                                        or [])
        policy = plugin.mixed_precision_policy
        if policy is not None and policy.reduce_dtype in (torch.bfloat16, torch.float16):
            from torch.distributed.fsdp import MixedPrecisionPolicy

            # accelerate reduces gradients in the compute dtype; afinar keeps trained weights,
            # their gradients and the optimizer state in fp32, so gradients are summed in fp32.
            plugin.mixed_precision_policy = MixedPrecisionPolicy(
                param_dtype=policy.param_dtype, reduce_dtype=torch.float32,
                output_dtype=policy.output_dtype, cast_forward_inputs=policy.cast_forward_inputs)
    elif kind == "deepspeed":
        _configure_deepspeed(accelerator, loss_model, config)
    loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    if kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        units = sum(isinstance(m, FSDPModule) for m in loss_model.modules())
        say(f"FSDP2 over {accelerator.num_processes} processes: {units} sharded units; "
            "checkpoints hold full tensors, gathered on rank 0")
    elif kind == "deepspeed":
        stage = accelerator.state.deepspeed_plugin.zero_stage
        say(f"DeepSpeed ZeRO-{stage} over {accelerator.num_processes} process(es); optimizer "
            "state is checkpointed in DeepSpeed's format (resume with the same process count)")
    return loss_model, optimizer


def _configure_deepspeed(accelerator, loss_model, config) -> None:
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        ds["train_micro_batch_size_per_gpu"] = config.batch_size  # no dataloader to infer it from
    if plugin.is_auto("gradient_clipping"):
        ds["gradient_clipping"] = float(config.max_grad_norm or 0.0)
    accumulation = ds.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise AfinarError(
            f"the DeepSpeed config sets gradient_accumulation_steps={accumulation}: afinar "
            "accumulates micro-batches itself (normalised by the target tokens of the whole "
            "accumulated batch)",
            "set gradient_accumulation_steps: 1 in the DeepSpeed config and "
            f"--set gradient_accumulation_steps={accumulation} in afinar")
    ds["gradient_accumulation_steps"] = 1
    if plugin.zero_stage == 3:
        import deepspeed

        # SupervisedLoss applies the output head's weight itself (only where there are labels),
        # outside the head module's forward, so ZeRO-3 must be told to gather it there too.
        deepspeed.zero.register_external_parameter(loss_model, loss_model._head[0].weight)


def accumulating(accelerator, loss_model, last: bool):
    """The context for one micro-batch of an accumulated step: gradients are only synchronised
    (and, under DeepSpeed, the optimizer only stepped) at the last one."""
    if engine(accelerator) == "deepspeed":
        return nullcontext() if last else _deepspeed_no_step(accelerator)
    if accelerator.num_processes > 1 and not last:
        return accelerator.no_sync(loss_model)
    return nullcontext()


@contextmanager
def _deepspeed_no_step(accelerator):
    # accelerate's DeepSpeed backward steps the engine whenever sync_gradients is set; afinar
    # does not use accelerator.accumulate(), so it is cleared for the micro-batches before the last.
    accelerator.gradient_state._set_sync_gradients(False)
    try:
        yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _fsdp_trainable(loss_model, model) -> dict:
    """Full trainable tensors on rank 0 (empty elsewhere); every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(loss_model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    wanted = set(_trainable_names(model))
    return {n[len("model."):]: t for n, t in full.items() if n[len("model."):] in wanted}


def _deepspeed_trainable(accelerator, model) -> dict:
    """Under ZeRO-3 each parameter is gathered in turn (one at a time: full fine-tuning of a
    large model never holds all of it); ZeRO-1/2 keep whole parameters on every process."""
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None,
                                               enabled=hasattr(param, "ds_id")):
            if accelerator.is_main_process:
                out[name] = param.detach().cpu().clone()
    return out


def _rng_ranks(accelerator) -> list | None:
    """Every process's RNG states, on rank 0 (dropout draws differ between processes)."""
    if accelerator.num_processes == 1:
        return None
    main = accelerator.is_main_process
    out = [None] * accelerator.num_processes if main else None
    torch.distributed.gather_object(ckpt.rng_state(), out, dst=0)
    return out


def gather_checkpoint(accelerator, loss_model, model, optimizer, run: Path, step: int):
    """(trainable tensors, optimizer state, RNG states by rank) for `state.save_checkpoint` on
    rank 0; Nones on the other ranks. Every process must call it (it gathers)."""
    rng = _rng_ranks(accelerator)
    trainable, optimizer_state = _gather_tensors(accelerator, loss_model, model, optimizer, run,
                                                 step)
    return trainable, optimizer_state, rng


def _gather_tensors(accelerator, loss_model, model, optimizer, run: Path, step: int):
    kind = engine(accelerator)
    main = accelerator.is_main_process
    if kind is None:
        return (adapters.trainable_state(model), optimizer.state_dict()) if main else (None, None)
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        trainable = _fsdp_trainable(loss_model, model)
        optim = get_optimizer_state_dict(loss_model, optimizer.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        return (trainable, {"format": "fsdp-full", "state": optim}) if main else (None, None)
    tag = f"step-{step:06d}"
    folder = ckpt.checkpoints_dir(run) / _DEEPSPEED_DIR
    loss_model.save_checkpoint(str(folder), tag=tag, exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    trainable = _deepspeed_trainable(accelerator, model)
    if not main:
        return None, None
    kept = {p.name for p in ckpt.checkpoints_dir(run).glob("step-*")} | {tag}
    for old in folder.iterdir():  # tags whose step folder was pruned (or never completed)
        if old.is_dir() and old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return trainable, {"format": "deepspeed", "tag": tag}


def restore(accelerator, loss_model, model, optimizer, scheduler, payload: dict, run: Path):
    """Loads a checkpoint into the (possibly sharded) model and optimizer; returns its state."""
    kind = engine(accelerator)
    ranks = (accelerator.process_index, accelerator.num_processes)
    saved = payload["optimizer"]
    found = saved.get("format") if isinstance(saved, dict) else None
    wanted = {None: None, "fsdp": "fsdp-full", "deepspeed": "deepspeed"}[kind]
    if found != wanted:
        names = {None: "one process or DDP", "fsdp-full": "FSDP", "deepspeed": "DeepSpeed"}
        raise AfinarError(f"{run}: the checkpoint was written under {names[found]} and this "
                          f"run uses {names[wanted]}",
                          "resume with the same launcher and accelerate config as the run")
    if kind is None:
        adapters.load_trainable_state(model, payload["trainable"])
        return ckpt.restore(payload, optimizer, scheduler, *ranks)
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)

        missing = set(payload["trainable"]) - set(_trainable_names(model))
        if missing:
            raise RuntimeError(f"checkpoint has tensors the model lacks: {sorted(missing)[:5]}")
        # Every process read the same full tensors; each keeps its own shard of them.
        set_model_state_dict(loss_model, {f"model.{n}": t for n, t in payload["trainable"].items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
        set_optimizer_state_dict(loss_model, optimizer.optimizer, saved["state"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        folder = ckpt.checkpoints_dir(run) / _DEEPSPEED_DIR
        if not (folder / saved["tag"]).is_dir():
            raise AfinarError(f"{folder / saved['tag']}: DeepSpeed checkpoint missing",
                              "it is written next to state.pt; resume needs both")
        # Weights (and ZeRO's fp32 master copies) and the partitioned optimizer state.
        loss_model.load_checkpoint(str(folder), tag=saved["tag"], load_module_strict=False,
                                   load_lr_scheduler_states=False)
    return ckpt.restore(payload, None, scheduler, *ranks)


def full_weights(accelerator, loss_model, model) -> dict | None:
    """The trained weights as full tensors for `save_pretrained(state_dict=...)` on rank 0, or
    None when the model is whole on every process (save_pretrained reads it directly).
    Under FSDP and ZeRO-3 every process must call it."""
    kind = engine(accelerator)
    if kind == "fsdp":
        return _fsdp_trainable(loss_model, model)
    if kind == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return _deepspeed_trainable(accelerator, model)
    return None
