"""The plan of a configured run, as `afinar plan` and `afinar train` both compute it.

    plan = plan_for_config(config, prepared.train, prepared.held, epochs, device, "fp32")
    plan = plan_command(config, device_name="RTX 3060 12GB")   # reads and tokenises the data

Only configuration files and the tokenizer are read; the weights are never loaded.
"""

from __future__ import annotations

import os
from typing import Callable

from afinar.config import TrainConfig, auto_epochs, parse_memory
from afinar.errors import AfinarError
from afinar.plan.hardware import Target, find_target, process_rss, this_machine
from afinar.plan.memory import MB, checkpoint_bytes
from afinar.plan.planner import Plan, PlanData, make_plan, with_settings

EVALUATIONS = 11  # the loop evaluates about 10 times, plus the base model's held-out loss


def _budget(config: TrainConfig, target: Target, runtime: int) -> int:
    if config.max_memory:
        return parse_memory(config.max_memory)
    # On a CPU, MemAvailable excludes what this process already holds, which the peak includes.
    return target.memory_bytes + (runtime if target.kind == "cpu" else 0)


def as_sequences(items: list) -> list:
    """Preference pairs as the sequences a batch holds (both sides); other items unchanged."""
    from afinar.data.pairs import PairTokenized

    if items and isinstance(items[0], PairTokenized):
        return [side for pair in items for side in pair.sides()]
    return items


def plan_for_config(config: TrainConfig, train, held, epochs: int, device, precision: str,
                    model_config=None, target: Target | None = None,
                    weights_folder: str | None = None, compiled: bool = False) -> Plan:
    """On this machine's CPU the time comes from a training step measured here (plan/speed.py,
    cached); for a GPU, from its matmul throughput."""
    from afinar.models.shape import read_model_config
    from afinar.plan.speed import probe_for

    if train is not as_sequences(train):  # a batch of N pairs is 2N sequences
        train, held = as_sequences(train), as_sequences(held)
        config = config.model_copy(update={"batch_size": config.batch_size * 2})

    model_config = model_config or read_model_config(config.model)
    if target is None:
        target = this_machine(device, precision)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = PlanData.from_tokenized(train, epochs, held, EVALUATIONS)
    speed = None
    if target.kind == "cpu" and train:
        speed = probe_for(config, model_config, precision, data.lengths)
    # A CPU run's peak resident memory includes the process itself (Python, torch, the
    # tokenizer, the data, the libraries training loads): measured now, after the step probe
    # (which gives its memory back). A GPU's peak counts tensors only.
    runtime = 0
    if target.kind == "cpu":
        _import_training_libraries(config, compiled)
        runtime = process_rss()
    return make_plan(config, model_config, data, target, precision,
                     _budget(config, target, runtime), runtime, world,
                     file_bytes=checkpoint_bytes(weights_folder) if weights_folder else None,
                     speed=speed, compiled=compiled)


def _import_training_libraries(config: TrainConfig, compiled: bool) -> None:
    """What the loop imports after its plan (peft alone pulls in about 140 MB of modules), so
    that the plan's measure of this process counts it."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401

    if config.quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            pass  # loading the weights says what to install
    if compiled:
        import torch._inductor.compile_fx  # noqa: F401


def plan_command(config: TrainConfig, device_name: str | None = None,
                 notify: Callable = lambda message: None) -> Plan:
    """`afinar plan`: the data read and tokenised with the model's tokenizer, the shape from its
    configuration, the throughput from the table (device_name) or measured on this machine."""
    from afinar.data.prepare import prepare_data
    from afinar.data.tokenize import ChatEncoder
    from afinar.models.load import (load_tokenizer, pick_device, pick_precision,
                                    read_generation_config, stop_token_ids)
    from afinar.models.registry import resolve_model
    from afinar.models.shape import read_model_config

    model_config = read_model_config(config.model, notify)
    source, weights = config.model, None
    if os.path.isdir(source) or "/" not in source or source.endswith(".gguf"):
        resolved = resolve_model(config.model, notify=notify)
        source = resolved.tokenizer_source
        weights = resolved.weights if os.path.isdir(resolved.weights) else None
    tokenizer = load_tokenizer(source)
    stops = stop_token_ids(tokenizer, generation_config=read_generation_config(source))
    data = prepare_data(config, ChatEncoder(tokenizer, stops))
    epochs = (auto_epochs(len(data.train), sum(len(t.input_ids) for t in as_sequences(data.train)))
              if config.epochs == "auto" else config.epochs)
    if config.max_steps:
        epochs = min(epochs, epochs_for_steps(config, len(data.train)))
    if device_name:
        target = find_target(device_name)
        precision = config.precision if config.precision != "auto" else (
            "bf16" if target.bf16 else "fp16")
        device = None
        reason = (f"precision {precision} (as configured)" if config.precision != "auto" else
                  f"precision auto: {precision}, the fastest half precision {target.name} has")
    else:
        from afinar.plan.speed import choose_precision

        device = pick_device(config.device)
        pick_precision(config.precision, device)  # a precision this device lacks fails here
        choice = choose_precision(config, model_config, device,
                                  [len(t.input_ids) for t in as_sequences(data.train)])
        precision, reason, target = choice.precision, choice.reason, None
    plan = plan_for_config(config, data.train, data.held, epochs, device, precision,
                           model_config=model_config, target=target, weights_folder=weights)
    plan.notes.insert(0, reason)
    return plan


def epochs_for_steps(config: TrainConfig, n_train: int) -> float:
    """The epochs `max_steps` lets a run train on `n_train` examples (a fraction, often)."""
    per_epoch = max(1, -(-n_train // config.batch_size) // config.gradient_accumulation_steps)
    return config.max_steps / per_epoch


def does_not_fit_error(plan: Plan, config: TrainConfig) -> AfinarError:
    need, budget = plan.peak_bytes / MB, plan.budget_bytes / MB
    if plan.alternatives:
        options = "; or ".join(
            " ".join(f"--set {part}" for part in option.settings.describe().split())
            + f" (≈ {option.peak_bytes / MB:,.0f} MB)" for option in plan.alternatives)
        hint = f"settings that fit: {options}"
    else:
        hint = ("no batch size, checkpointing or quantisation fits this budget: use a smaller "
                "model, a shorter max_seq_length, or a device with more memory")
    hint += "; `afinar plan` shows every part of the estimate"
    return AfinarError(f"this run needs about {need:,.0f} MB at its peak but "
                       f"{plan.target.name} has {budget:,.0f} MB"
                       + (" (max_memory)" if config.max_memory else ""), hint)


__all__ = ["plan_for_config", "plan_command", "does_not_fit_error", "with_settings",
           "epochs_for_steps"]
