"""Memory a training run needs, part by part, from the model's shape and the data's lengths.

    weights = weight_budget(model_config, "lora", lora, "bf16", "4bit")
    probe = probe_activations(model_config, lora, "bf16", seq_len=512, rows=4, target_rows=900)
    parts = memory_parts(weights, probe, batch_size=4, runtime_bytes=...)

Parts, in bytes (what each costs and why):
- runtime: the process itself (CPU: Python, torch, the libraries, the tokenizer, the data),
  measured by the plan (plan/run.py); 0 on a GPU.
- weights: frozen linear weights in their stored dtype (fp32; bf16/fp16 for LoRA under mixed
  precision; 4-bit nf4 with double-quantised scales; int8 with a scale per row), everything else
  (embeddings, norms, biases) in fp32, trainable weights in fp32. On a CPU, what is resident:
  see resident_weights.
- optimizer: AdamW's two fp32 moments per trained weight, from the first optimizer step on.
- activations: what autograd keeps for the backward pass, and step: everything else alive at the
  step's peak (autocast's casts, the rows the loss picks out, the fused head's chunk of logits
  and its cast weight, the gradients of the activations and of the weights). Both measured by
  one fake training step of the model's own code (plan/activations.py), which runs what the loop
  runs: the same autocast, bf16-stored frozen weights, bitsandbytes-like 4/8-bit layers,
  gradient checkpointing, the loss of losses/supervised.py and the backward pass.
- allocator (CPU only): what the process holds beyond its live tensors. oneDNN keeps a compiled
  kernel for every matmul shape it meets (bf16 matmuls on x86; fp32 ones go through MKL, which
  keeps none), so every new micro-batch shape adds the step's matmuls, up to the cache's
  capacity: counted from the probe's matmuls and the run's batches, priced by a measure of this
  machine (kernel_cache_bytes). And glibc's heap keeps freed blocks it cannot return (holes
  between live ones): resident memory creeps up over a run's first steps as batches of other
  shapes reuse them imperfectly, to a share of the step's live peak measured on whole runs
  (HEAP_SHARE).

On a CPU the peak can also come while the weights load: the checkpoint file is memory-mapped
(its pages count as resident while they are read) and every tensor whose dtype changes is a
copy beside it; tensors kept in the file's dtype stay views of the mapped pages.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

from afinar.plan.activations import ActivationProbe

MB = 2**20
# nf4: 4 bits a weight, an 8-bit absmax per block of 64 weights (double quantisation), and an
# fp32 second-level scale per 256 blocks (bitsandbytes' defaults, as QLoRA describes them).
NF4_BYTES_PER_WEIGHT = 0.5 + (1 + 4 / 256) / 64
INT8_BYTES_PER_WEIGHT = 1.0  # + one fp32 scale per output row, added per layer
ADAMW_BYTES_PER_WEIGHT = 8  # two fp32 moments
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# glibc's heap at a run's peak, beyond the live tensors, as a share of the step's live peak.
# Measured on the embedded model (bench/bench_plan.py, 2-core AMD EPYC with AVX512-BF16, glibc
# 2.36, torch 2.13, 2026-12-06): the peak resident memory minus every other part, over the
# step's live peak, once a run's resident memory stops creeping up (16 steps of batch 2 x 128,
# and the demo's whole run of 102 steps of batch 4 x up to 198):
# - eager steps (freed blocks of 1 MiB and more unmapped at once, train/host_memory.py):
#   0.72-1.04 for fp32 and bf16 LoRA, the demo's fp32 run 0.45 and bf16 run 0.59 (40 steps);
#   4-bit 0.64 (bf16 compute) and 1.37 (fp32: every layer's result cast and copied, as peft's
#   4-bit layer does, churns more small blocks);
# - compiled layers (glibc's default heap; Inductor keeps fewer tensors): 0.29-0.34 for fp32,
#   bf16 and 4-bit bf16, 1.02 for 4-bit fp32; the demo's bf16 run 0.82.
# A run of a few steps whose first batch is its largest (the batcher's order) stays below.
HEAP_SHARE = {"eager": 0.7, "eager-quantized": 1.0, "compiled": 0.5}
_KERNEL_SHAPES = 16
_KERNEL_NOISE = 64 * 1024  # a page or two of heap between measures is not a kernel cache


@dataclass(frozen=True)
class WeightBudget:
    total_params: int
    linear_params: int  # the frozen linears that LoRA adapts and 4/8-bit replaces
    trainable_params: int
    weights_bytes: int


def frozen_linear_bytes_per_weight(method: str, dora: bool, precision: str,
                                   quantization: str) -> float:
    """How the loop stores frozen linear weights (see models/load.py)."""
    if method == "full":
        return 4.0
    if quantization == "4bit":
        return NF4_BYTES_PER_WEIGHT
    if quantization == "8bit":
        return INT8_BYTES_PER_WEIGHT
    return 4.0 if dora else float(COMPUTE_BYTES[precision])


def weight_budget(model_config, method: str, lora, precision: str,
                  quantization: str = "none") -> WeightBudget:
    """Exact parameter counts from the architecture on the meta device (nothing allocated)."""
    from afinar.models import adapters
    from afinar.models.shape import linear_weights, meta_model, parameter_count

    model = meta_model(model_config)
    total = parameter_count(model)
    linears = linear_weights(model)
    linear_params = sum(m.weight.numel() for m in linears)
    per_linear = frozen_linear_bytes_per_weight(method, bool(lora and lora.dora), precision,
                                                quantization)
    row_scales = sum(m.out_features for m in linears) * 4 if quantization == "8bit" else 0
    frozen = linear_params * per_linear + (total - linear_params) * 4 + row_scales
    if method == "full":
        return WeightBudget(total, linear_params, total, int(total * 4))
    model = adapters.attach(model, "lora", lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return WeightBudget(total, linear_params, trainable, int(frozen + trainable * 4))


@dataclass(frozen=True)
class MemoryParts:
    runtime: int  # the process itself (CPU: Python, torch, the tokenizer, the data)
    weights: int
    optimizer: int  # AdamW's moments, from the first optimizer step on
    activations: int  # what autograd keeps for the backward pass
    step: int  # the rest of the step's peak: logits, casts, gradients, the backward's work
    allocator: int = 0  # CPU: memory the allocator and the kernels hold beyond live tensors

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_mb(self) -> dict:
        out = {k: round(v / MB, 1) for k, v in asdict(self).items()}
        out["total"] = round(self.total / MB, 1)
        return out


def memory_parts(weights: WeightBudget, probe: ActivationProbe, batch_size: int,
                 runtime_bytes: int, method: str = "lora", tied_head: bool = True,
                 allocator_bytes: int = 0) -> MemoryParts:
    """Peak bytes of a step over a micro-batch of `batch_size` examples (from the second step on,
    when AdamW's state exists), from a probe of the same step (plan/activations.py) over
    `probe.rows` examples: a probe over another number of examples is scaled to this one."""
    scale = batch_size / max(1, probe.rows)
    activations = int(probe.saved_bytes * batch_size)
    step = max(0, int(probe.step_peak_bytes * scale) - activations)
    if method == "full" and not tied_head:
        # The probe runs the fused head on a detached weight (see activations._supervised_loss).
        step += probe.vocab_size * probe.hidden_size * 4
    trainable = weights.trainable_params
    return MemoryParts(runtime=runtime_bytes, weights=weights.weights_bytes,
                       optimizer=trainable * ADAMW_BYTES_PER_WEIGHT, activations=activations,
                       step=step, allocator=allocator_bytes)


def cpu_allocator_bytes(probe: ActivationProbe, batch_size: int, compiled: bool,
                        batch_shapes: int) -> int:
    """Resident memory a CPU run holds beyond its live tensors at its peak: the kernels oneDNN
    compiled for the matmul shapes it met (each new batch shape brings the step's matmuls anew),
    up to its cache's capacity, and glibc's heap beyond the step's live peak (HEAP_SHARE)."""
    kernels = 0
    for dtype, count in (probe.matmuls or {}).items():
        per_kernel = kernel_cache_bytes(dtype)
        kernels += min(count * max(1, batch_shapes), kernel_cache_capacity()) * per_kernel
    live = probe.step_peak_bytes * batch_size / max(1, probe.rows)
    mode = "compiled" if compiled else "eager-quantized" if probe.quantized else "eager"
    heap = HEAP_SHARE[mode] * live
    return int(kernels + heap)


def kernel_cache_capacity() -> int:
    """oneDNN's primitive cache holds this many kernels (its default, or the environment's)."""
    try:
        return int(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024"))
    except ValueError:
        return 1024


@functools.lru_cache(maxsize=None)
def kernel_cache_bytes(dtype: str) -> int:
    """Bytes this process keeps for each new matmul shape in `dtype` (measured: a small matmul,
    forward and backward, at SHAPES new shapes; resident memory before and after with freed
    heap pages returned). On a 2-core AVX512-BF16 EPYC: about 0.55 MB a kernel in bf16, none in
    fp32. 0 where it cannot be measured (no glibc)."""
    import ctypes
    import ctypes.util

    import torch

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}.get(dtype)
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        statm = open("/proc/self/statm")
    except (OSError, AttributeError):
        return 0
    if torch_dtype is None:
        return 0

    def resident() -> int:
        trim(0)
        statm.seek(0)
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    weight = torch.randn(96, 80, dtype=torch_dtype)

    def matmuls(rows: int) -> None:
        x = torch.randn(rows, 80, dtype=torch_dtype, requires_grad=True)
        (x @ weight.t()).float().sum().backward()  # two kernels: forward, input gradient

    matmuls(7)  # one-time set-up of the library
    before = resident()
    for rows in range(8, 8 + _KERNEL_SHAPES):
        matmuls(rows)
    grown = resident() - before
    statm.close()
    per_kernel = grown / (2 * _KERNEL_SHAPES)
    return int(per_kernel) if per_kernel > _KERNEL_NOISE else 0


def checkpoint_bytes(folder) -> dict[str, int]:
    """Bytes per dtype ("F32", "BF16", ...) of a folder's safetensors files, from their headers
    (the first few KB of each file); {} when there are none."""
    import json
    import struct
    from pathlib import Path

    sizes: dict[str, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                sizes[info["dtype"]] = sizes.get(info["dtype"], 0) + end - start
    return sizes


_SAFETENSORS_DTYPE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def resident_weights(file_bytes: dict[str, int], weights: WeightBudget, frozen_dtype: str,
                     quantized: bool, compute_dtype: str = "fp32") -> tuple[int, int]:
    """(bytes the weights hold resident during training, extra bytes while they load) on a
    CPU. Tensors kept in the file's dtype are views of the memory-mapped checkpoint, and then
    the whole mapped file stays resident for the run (the load reads every page); converted
    tensors are copies, and the mapped file is only resident while they are made.

    What stays a view (models/load.py): unquantised, the frozen linears when the file holds
    them in `frozen_dtype`, and embeddings, norms and biases (kept in fp32) when it holds fp32.
    Quantised (models/quantize.py), the linears are always new 4/8-bit tensors, and everything
    else loads in the compute dtype and then goes to fp32 (peft's k-bit preparation): a view
    survives only when the file and the compute dtype are both fp32."""
    total_file = sum(file_bytes.values())
    if not total_file:
        return weights.weights_bytes, 0

    def mostly(dtype: str) -> bool:
        return file_bytes.get(dtype, 0) >= total_file * 0.9

    copied = weights.weights_bytes
    views = False
    if not quantized and mostly(_SAFETENSORS_DTYPE.get(frozen_dtype, "")):
        copied -= int(weights.linear_params * COMPUTE_BYTES[frozen_dtype])
        views = True
    if mostly("F32") and (not quantized or compute_dtype == "fp32"):
        copied -= (weights.total_params - weights.linear_params) * 4
        views = True
    copied = max(0, copied)
    if views:
        return total_file + copied, 0
    return copied, total_file
