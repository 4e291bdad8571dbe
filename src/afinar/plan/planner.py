"""The plan of a training run: memory part by part, the settings that fit a budget, the time and
the cost, before any weight is loaded.

    plan = make_plan(config, model_config, PlanData.from_tokenized(train, epochs), target,
                     precision="bf16", budget_bytes=12 * 2**30, runtime_bytes=0)
    plan.fits, plan.peak_bytes, plan.to_dict()

`afinar plan` prints it; `afinar train` computes the same plan first (one line, and plan.json in
the run directory) and stops before loading the weights when the run cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from afinar.plan.activations import ActivationProbe, probe_activations
from afinar.plan.hardware import Target, hardware_table
from afinar.plan.memory import (MB, MemoryParts, WeightBudget, cpu_allocator_bytes, memory_parts,
                                resident_weights, weight_budget)
from afinar.plan.speed import StepProbe

# Share of the measured matmul peak a LoRA training step reaches on a CPU (norms, rotary,
# softmax, the optimizer and Python between the matmuls): measured with the embedded model on a
# 2-core Zen 3 in fp32 (bench/bench_plan.py prints the ratio of estimated to measured time).
CPU_EFFICIENCY = 0.45
# The step probe (plan/speed.py) runs eagerly with glibc's default heap; the loop runs either
# compiled layers or eager steps that return freed memory to the OS (train/host_memory.py:
# fresh pages faulted every step, which costs bf16's extra autocast copies most). The loop's
# steady tokens/s (steps 2..16) over the probe's, on the embedded model (2-core EPYC with
# AVX512-BF16, batch 2 x 128, bench/bench_plan.py, 2026-12-06, nothing else running; eager
# cases are the mean of two runs, which differed by up to 25%: that VM's own noise):
# eager fp32 1.34, 4-bit fp32 compute 1.29; eager bf16 1.02, 4-bit bf16 compute 1.02 (against
# factors of 0.75); compiled fp32 1.03, bf16 0.95 (against 0.9); compiled 4-bit (bitsandbytes'
# layers break Inductor's graphs) fp32 0.83, bf16 0.66 (against 0.9).
CPU_SPEED = {  # (compiled, quantized) -> precision -> the loop's speed over the probe's
    (False, False): {"fp32": 1.0, "bf16": 0.75},
    (False, True): {"fp32": 1.0, "bf16": 0.75},
    (True, False): {"fp32": 0.93, "bf16": 0.86},
    (True, True): {"fp32": 0.75, "bf16": 0.6},
}
# Inductor's first compile of a decoder layer (forward and backward graphs) on a small CPU; a few
# seconds when its on-disk cache already holds the graphs.
COMPILE_SECONDS = 30.0
EVAL_SPEED = 0.6
CUDA_CONTEXT_BYTES = 500 * MB  # the CUDA context and cuBLAS workspace, outside torch's count


@dataclass(frozen=True)
class PlanData:
    lengths: list[int]  # tokens of each training example, after max_seq_length
    targets: list[int]  # labelled (assistant) tokens of each
    epochs: int
    held_out_tokens: int = 0
    evaluations: int = 0

    @classmethod
    def from_tokenized(cls, train, epochs: int, held=(), evaluations: int = 0) -> "PlanData":
        return cls([len(t.input_ids) for t in train],
                   [sum(1 for label in t.labels[1:] if label != -100) for t in train],
                   epochs, sum(len(t.input_ids) for t in held), evaluations if held else 0)


@dataclass(frozen=True)
class Settings:
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    quantization: str

    def describe(self) -> str:
        parts = [f"batch_size={self.batch_size}",
                 f"gradient_accumulation_steps={self.gradient_accumulation_steps}",
                 f"gradient_checkpointing={str(self.gradient_checkpointing).lower()}"]
        if self.quantization != "none":
            parts.append(f"quantization={self.quantization}")
        return " ".join(parts)


@dataclass
class Option:
    settings: Settings
    memory: MemoryParts
    loading_bytes: int = 0  # resident while the weights load (CPU); 0 when not known

    @property
    def peak_bytes(self) -> int:
        return max(self.memory.total, self.loading_bytes)


@dataclass
class Plan:
    model: dict
    data: dict
    target: Target
    precision: str
    budget_bytes: int
    chosen: Option  # the configured settings (checkpointing decided when it was auto)
    alternatives: list[Option]  # settings that fit the budget, cheapest change first
    without_checkpointing: MemoryParts
    with_checkpointing: MemoryParts
    time: dict
    cost: dict
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.chosen.peak_bytes <= self.budget_bytes

    @property
    def peak_bytes(self) -> int:
        return self.chosen.peak_bytes

    def summary_line(self) -> str:
        s = self.chosen.settings
        return (f"plan: peak ≈ {self.peak_bytes / MB:,.0f} MB of {self.budget_bytes / MB:,.0f} MB "
                f"({self.target.name}); weights {self.chosen.memory.weights / MB:,.0f} MB, "
                f"activations {self.chosen.memory.activations / MB:,.0f} MB; checkpointing "
                f"{'on' if s.gradient_checkpointing else 'off'}; ≈ "
                f"{duration(self.time['train_seconds'])} for {self.data['epochs']:.3g} epoch(s)")

    def to_dict(self) -> dict:
        def option(o: Option) -> dict:
            return {**o.settings.__dict__, "peak_memory_mb": round(o.peak_bytes / MB, 1),
                    "memory_mb": o.memory.as_mb(), "loading_mb": round(o.loading_bytes / MB, 1)}
        return {
            "model": self.model, "data": self.data, "precision": self.precision,
            "target": {"name": self.target.name, "kind": self.target.kind,
                       "memory_mb": round(self.target.memory_bytes / MB), "tflops":
                       round(self.target.tflops, 3), "measured": self.target.measured},
            "budget_mb": round(self.budget_bytes / MB, 1), "fits": self.fits,
            "peak_memory_mb": round(self.peak_bytes / MB, 1),
            "settings": option(self.chosen),
            "memory_mb": {"without_checkpointing": self.without_checkpointing.as_mb(),
                          "with_checkpointing": self.with_checkpointing.as_mb()},
            "alternatives": [option(o) for o in self.alternatives],
            "time": self.time, "cost": self.cost, "notes": self.notes}


def duration(seconds: float) -> str:
    """Seconds as a reader wants them: 40 s, 12 min, 3.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _worst_batch(data: PlanData, batch_size: int) -> tuple[int, int]:
    """(examples, labelled rows) of the largest micro-batch: the batcher puts the longest
    examples together and that batch first, so its width is the longest example's."""
    n = min(batch_size, len(data.lengths))
    return n, sum(sorted(data.targets, reverse=True)[:n])


def _padded_tokens(data: PlanData, batch_size: int, seed: int) -> int:
    from afinar.data.batching import plan_batches

    return sum(len(b) * max(data.lengths[i] for i in b)
               for b in plan_batches(data.lengths, batch_size, seed, 0))


def _flops_per_token(weights: WeightBudget, model_config, method: str, seq_len: float,
                     target_share: float, checkpointing: bool) -> float:
    """Forward: 2 FLOPs per linear weight, attention scores and mixing over the context, the
    output head on labelled positions only. Backward: the gradient of the activations (2 per
    weight), plus the weights' own gradients for full fine-tuning; checkpointing adds a
    forward."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    layers = int(getattr(text, "num_hidden_layers", 0))
    heads = int(getattr(text, "num_attention_heads", 1))
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    attention = 2 * 2 * layers * heads * head_dim * seq_len / 2  # causal: half the context
    head = 2 * text.hidden_size * text.vocab_size * target_share
    forward = 2 * weights.linear_params + attention + head
    backward = 2 * forward if method == "full" else forward
    return forward * (3 if checkpointing else 2) + (backward - forward)


def make_plan(config, model_config, data: PlanData, target: Target, precision: str,
              budget_bytes: int, runtime_bytes: int, world_size: int = 1,
              probe: ActivationProbe | None = None, file_bytes: dict | None = None,
              speed: StepProbe | None = None, compiled: bool = False) -> Plan:
    """file_bytes: the checkpoint's bytes per dtype (memory.checkpoint_bytes), for the loading
    peak on a CPU; None when the files are not local. speed: a training step measured on this
    machine (plan/speed.py), which times the run instead of the matmul peak; compiled: whether
    the loop compiles its decoder layers (it runs at another speed then)."""
    file_bytes = file_bytes or {}
    quant = config.quantization
    lora = config.lora if config.method == "lora" else None
    seq_len = max(data.lengths)
    n0, rows0 = _worst_batch(data, config.batch_size)
    probes: dict[tuple, ActivationProbe] = {}

    def probe_for(checkpointing: bool, q: str) -> ActivationProbe:
        """The step over the configured worst batch; other batch sizes scale it."""
        if probe is not None:
            return probe
        if (checkpointing, q) not in probes:
            probes[checkpointing, q] = probe_activations(
                model_config, lora, precision, seq_len,
                frozen_dtype=_probe_frozen_dtype(config, precision, q), rows=n0,
                target_rows=rows0, quantization=q, checkpointing=checkpointing)
        return probes[checkpointing, q]

    budgets: dict[str, WeightBudget] = {}

    def weights_for(q: str) -> WeightBudget:
        if q not in budgets:
            budgets[q] = weight_budget(model_config, config.method, config.lora, precision, q)
        return budgets[q]

    frozen = _stored_dtype(config, precision)
    tied = _tied_head(model_config)
    shapes: dict[int, int] = {}  # batch size -> micro-batch shapes the run trains on

    def option(batch: int, accumulation: int, checkpointing: bool, q: str) -> Option:
        n, rows = _worst_batch(data, batch)
        step = probe_for(checkpointing, q)
        allocator = 0
        if target.kind == "cpu":
            if batch not in shapes:  # the same for every option of this batch size
                shapes[batch] = _batch_shapes(data, batch, config.seed)
            allocator = cpu_allocator_bytes(step, n, compiled, shapes[batch])
        parts = memory_parts(weights_for(q), step, n, runtime_bytes, config.method, tied,
                             allocator)
        loading = 0
        if target.kind == "cpu":  # a GPU's memory never holds the mapped file
            resident, mapped = resident_weights(file_bytes, weights_for(q), frozen, q != "none",
                                                precision)
            parts = replace(parts, weights=resident)
            loading = runtime_bytes + mapped + resident if mapped else 0
        return Option(Settings(batch, accumulation, checkpointing, q), parts, loading)

    b, ga = config.batch_size, config.gradient_accumulation_steps
    off, on = option(b, ga, False, quant), option(b, ga, True, quant)
    wanted = config.gradient_checkpointing
    if wanted == "auto":
        chosen = off if off.peak_bytes <= budget_bytes else on
    else:
        chosen = on if wanted else off

    alternatives = []
    if chosen.peak_bytes > budget_bytes:
        quants = [quant] + ([q for q in ("8bit", "4bit") if q != quant and
                            (quant, q) != ("4bit", "8bit")] if config.method == "lora" else [])
        for q in quants:
            batch, accumulation = b, ga
            while batch >= 1 and len(alternatives) < 3:
                for ckpt in (False, True):
                    candidate = option(batch, accumulation, ckpt, q)
                    if candidate.peak_bytes <= budget_bytes:
                        alternatives.append(candidate)
                        break
                else:
                    batch, accumulation = batch // 2, accumulation * 2
                    continue
                break

    weights = weights_for(quant)
    padded = _padded_tokens(data, chosen.settings.batch_size, config.seed)
    if speed is not None:
        time = _probed_time(config, model_config, data, speed, weights, chosen.settings,
                            world_size, padded, compiled)
    else:
        time = _time_estimate(config, model_config, data, target, weights, chosen.settings,
                              world_size, padded)
    return Plan(
        model={"name": config.model, "architecture": type(model_config).__name__,
               "parameters": weights.total_params, "linear_parameters": weights.linear_params,
               "trainable_parameters": weights.trainable_params, "method": config.method,
               "quantization": quant},
        data={"train_examples": len(data.lengths), "tokens_per_epoch": sum(data.lengths),
              "labelled_tokens_per_epoch": sum(data.targets), "longest_example": seq_len,
              "epochs": data.epochs},
        target=target, precision=precision, budget_bytes=budget_bytes, chosen=chosen,
        alternatives=alternatives, without_checkpointing=off.memory,
        with_checkpointing=on.memory, time=time,
        cost=_costs(config, model_config, data, time, target, weights, chosen.settings,
                    world_size, padded, chosen.memory),
        notes=_notes(chosen, budget_bytes, wanted))


def _tied_head(model_config) -> bool:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    return bool(getattr(text, "tie_word_embeddings", getattr(model_config,
                                                             "tie_word_embeddings", True)))


def _batch_shapes(data: PlanData, batch_size: int, seed: int) -> int:
    """How many different micro-batch shapes (examples x longest length) the run trains on:
    every epoch's batches, as the loop draws them (data/batching.py)."""
    from afinar.data.batching import plan_batches

    shapes: set[tuple[int, int]] = set()
    per_epoch = -(-len(data.lengths) // batch_size)
    left = max(1, math.ceil(data.epochs * per_epoch))  # max_steps may end a run mid-epoch
    for epoch in range(max(1, math.ceil(data.epochs))):
        for b in plan_batches(data.lengths, batch_size, seed, epoch)[:left]:
            shapes.add((len(b), max(data.lengths[i] for i in b)))
        left -= per_epoch
        if left <= 0:
            break
    return len(shapes)


def _stored_dtype(config, precision: str) -> str:
    """How the loop keeps frozen linear weights: "bf16"/"fp16" or "fp32"."""
    if config.method == "lora" and not config.lora.dora and precision in ("bf16", "fp16"):
        return precision
    return "fp32"


def _probe_frozen_dtype(config, precision: str, quantization: str | None = None):
    import torch

    from afinar.models.load import COMPUTE_DTYPES, frozen_linear_dtype

    quantization = config.quantization if quantization is None else quantization
    if quantization != "none":  # bitsandbytes layers compute in the compute dtype
        return COMPUTE_DTYPES.get(precision, torch.float32)
    return frozen_linear_dtype(config.method, config.lora.dora, precision)


def _efficiency(config, target: Target) -> float:
    if target.kind == "cpu":
        return CPU_EFFICIENCY
    mfu = hardware_table()["mfu"]
    if config.quantization != "none":
        return float(mfu["quantized"])
    return float(mfu["full" if config.method == "full" else "lora"])


def _time_estimate(config, model_config, data: PlanData, target: Target, weights: WeightBudget,
                   settings: Settings, world_size: int, padded: int) -> dict:
    share = sum(data.targets) / max(1, padded)
    mean_len = padded / max(1, len(data.lengths))
    per_token = _flops_per_token(weights, model_config, config.method, mean_len, share,
                                 settings.gradient_checkpointing)
    efficiency = _efficiency(config, target)
    rate = target.tflops * 1e12 * efficiency * world_size
    train_seconds = padded * data.epochs * per_token / rate
    eval_per_token = _flops_per_token(weights, model_config, "lora", mean_len, share, False) / 3
    eval_seconds = data.held_out_tokens * data.evaluations * eval_per_token / rate
    return {"flops_per_token": round(per_token), "padded_tokens_per_epoch": padded,
            "tokens_per_s": round(rate / per_token, 1), "efficiency": efficiency,
            "throughput_source": "measured here" if target.measured else "datasheet × mfu",
            "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1)}


def _probed_time(config, model_config, data: PlanData, speed: StepProbe, weights: WeightBudget,
                 settings: Settings, world_size: int, padded: int, compiled: bool) -> dict:
    """The run's time from a step measured on this machine: decoder layers by padded token,
    the head by labelled token, the optimizer by step and trained weight."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config
    layers = int(text.num_hidden_layers)
    per_layer_token = speed.layer_seconds / speed.tokens
    forward_layer_token = speed.layer_forward_seconds / speed.tokens
    if settings.gradient_checkpointing:  # every layer's forward runs again in the backward pass
        per_layer_token += forward_layer_token
    per_label = speed.outside_seconds * speed.vocab_scale / max(1, speed.labelled)
    steps = -(-len(data.lengths) // settings.batch_size) // settings.gradient_accumulation_steps
    optimizer = speed.optimizer_seconds * weights.trainable_params / max(1, speed.trainable)
    factor = cpu_speed(speed.precision, compiled, settings.quantization != "none")
    epoch = (layers * per_layer_token * padded + per_label * sum(data.targets)
             + optimizer * max(1, steps)) / factor / world_size
    train_seconds = epoch * data.epochs + (COMPILE_SECONDS if compiled else 0.0)
    # An evaluation is a forward pass: the layers' forward and a third of the head's work (its
    # logits, without the gradients the training pass computes with them), without autograd's
    # bookkeeping: EVAL_SPEED of the probe's forward (the demo run, 2026-12-05: about 6.5 s per
    # evaluation measured in the loop's wall time against 10.4 s from the probe's forward).
    held_share = sum(data.targets) / max(1, sum(data.lengths))
    eval_token = (layers * forward_layer_token + per_label * held_share / 3) * EVAL_SPEED / factor
    eval_seconds = data.held_out_tokens * data.evaluations * eval_token / world_size
    tokens_per_s = sum(data.lengths) / max(1e-9, epoch)
    return {"padded_tokens_per_epoch": padded, "tokens_per_s": round(tokens_per_s, 1),
            "throughput_source": f"a {speed.precision} training step measured here "
                                 f"({speed.rows}x{speed.seq_len} tokens, 2 real-shaped layers)",
            "compiled": compiled, "compile_seconds": COMPILE_SECONDS if compiled else 0.0,
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(eval_seconds, 1),
            "step_probe": {"layer_s": round(speed.layer_seconds, 5),
                           "layer_forward_s": round(speed.layer_forward_seconds, 5),
                           "outside_s": round(speed.outside_seconds, 5),
                           "optimizer_s": round(speed.optimizer_seconds, 5),
                           "tokens": speed.tokens, "labelled": speed.labelled}}


def cpu_speed(precision: str, compiled: bool, quantized: bool) -> float:
    """The loop's speed over the step probe's on a CPU (CPU_SPEED; fp16 as bf16)."""
    by_precision = CPU_SPEED[compiled, quantized]
    return by_precision.get(precision, by_precision["bf16"])


def _costs(config, model_config, data: PlanData, time: dict, target: Target, weights,
           settings: Settings, world_size: int, padded: int, memory: MemoryParts) -> dict:
    from afinar.plan.hardware import find_target

    hours = (time["train_seconds"] + time["eval_seconds"]) / 3600
    table = hardware_table()
    # On a GPU: the training parts without this CPU process's own memory or its mapped file,
    # plus the CUDA context.
    gpu_need = (memory.total - memory.runtime - memory.weights + weights.weights_bytes
                + CUDA_CONTEXT_BYTES)
    gpus = []
    for gpu in table["gpus"]:
        other = find_target(gpu["name"])
        t = _time_estimate(config, model_config, data, other, weights, settings, world_size,
                           padded)
        seconds = t["train_seconds"] + t["eval_seconds"]
        gpus.append({"gpu": gpu["name"], "memory_gb": gpu["memory_gb"],
                     "fits": gpu_need <= other.memory_bytes, "seconds": round(seconds, 1),
                     "price_per_hour": gpu.get("price_per_hour"),
                     "usd": round(seconds / 3600 * gpu["price_per_hour"], 4)
                     if gpu.get("price_per_hour") is not None else None})
    billed = sum(data.lengths) * data.epochs
    openai = {model: round(billed / 1e6 * price, 2)
              for model, price in table["openai_training_per_million_tokens"].items()}
    return {"target_hours": round(hours, 3),
            "target_usd": round(hours * target.price_per_hour, 2)
            if target.price_per_hour is not None else None,
            "gpus": gpus, "openai_billed_tokens": billed, "openai_usd": openai}


def _notes(chosen: Option, budget: int, wanted) -> list[str]:
    notes = []
    if chosen.loading_bytes > chosen.memory.total:
        notes.append(f"the peak comes while the weights load (≈ {chosen.loading_bytes / MB:,.0f} "
                     "MB: the mapped checkpoint plus converted copies), not during training")
    if wanted == "auto":
        notes.append("gradient checkpointing " + (
            "on: the activations do not fit without it" if chosen.settings.gradient_checkpointing
            else "off: the activations fit (it would cost about a third more compute)"))
    if chosen.peak_bytes > budget:
        notes.append(f"does not fit: needs ≈ {chosen.peak_bytes / MB:,.0f} MB, budget "
                     f"{budget / MB:,.0f} MB")
    return notes


def with_settings(config, settings: Settings):
    """The config with a plan's settings applied (for suggestions a user can copy)."""
    return config.model_copy(update={
        "batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "quantization": settings.quantization})

