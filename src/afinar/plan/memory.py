"""Memory a training run needs, part by part, from the model's shape and the data's lengths.

    weights = weight_budget(model_config, "lora", lora, "bf16", "4bit")
    parts = memory_parts(weights, probe, batch_size=4, seq_len=512, target_rows=900, ...)

Parts, in bytes (what each costs and why):
- weights: frozen linear weights in their stored dtype (fp32; bf16/fp16 for LoRA under mixed
  precision; 4-bit nf4 with double-quantised scales; int8 with a scale per row), everything else
  (embeddings, norms, biases) in fp32, trainable weights in fp32.
- gradients and optimizer: fp32 gradient + AdamW's two fp32 moments per trainable weight.
- activations: what autograd keeps for the backward pass, measured by the probe
  (plan/activations.py) for one example and multiplied by the batch size; with checkpointing,
  each layer's input plus one layer's worth recomputed.
- loss: the labelled rows of the last hidden state, and one chunk of the output head's logits in
  fp32 with its gradient (train/losses.py computes the head in chunks of 1,024 rows).
- backward working set: the gradients of the activations, and the forward's temporaries that
  are not kept: measured at about 0.8 of the kept activations on a CPU (bench/bench_plan.py,
  the embedded model at batch sizes 1, 2 and 4).

On a CPU the peak can also come while the weights load: the checkpoint file is memory-mapped
(its pages count as resident while they are read) and every tensor whose dtype changes is a
copy beside it; tensors kept in the file's dtype stay views of the mapped pages.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from afinar.plan.activations import ActivationProbe

MB = 2**20
# nf4: 4 bits a weight, an 8-bit absmax per block of 64 weights (double quantisation), and an
# fp32 second-level scale per 256 blocks (bitsandbytes' defaults, as QLoRA describes them).
NF4_BYTES_PER_WEIGHT = 0.5 + (1 + 4 / 256) / 64
INT8_BYTES_PER_WEIGHT = 1.0  # + one fp32 scale per output row, added per layer
ADAMW_BYTES_PER_WEIGHT = 8  # two fp32 moments
LOSS_CHUNK_ROWS = 256  # train/losses.py CHUNK_ROWS
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BACKWARD_SHARE = 0.8


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
    gradients: int
    optimizer: int
    activations: int
    loss: int
    backward: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_mb(self) -> dict:
        out = {k: round(v / MB, 1) for k, v in asdict(self).items()}
        out["total"] = round(self.total / MB, 1)
        return out


def memory_parts(weights: WeightBudget, probe: ActivationProbe, batch_size: int,
                 target_rows: int, checkpointing: bool, runtime_bytes: int) -> MemoryParts:
    """Peak bytes of a step over the micro-batch of `batch_size` examples `probe.seq_len` long
    with `target_rows` labelled tokens (from the second step on, when AdamW's state exists)."""
    per_example = probe.checkpointed_bytes() if checkpointing else probe.saved_bytes
    activations = batch_size * per_example
    rows = max(1, target_rows)
    chunk = min(rows, LOSS_CHUNK_ROWS)
    # the rows' gradient (computed in the forward pass) + one chunk's fp32 logits, turned into
    # their gradient in place, and the copy cast for the matmul
    loss = rows * probe.hidden_size * 4 + chunk * probe.vocab_size * 4 * 2
    backward = int(BACKWARD_SHARE * activations)
    trainable = weights.trainable_params
    return MemoryParts(runtime=runtime_bytes, weights=weights.weights_bytes,
                       gradients=trainable * 4, optimizer=trainable * ADAMW_BYTES_PER_WEIGHT,
                       activations=activations, loss=loss, backward=backward)


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
                     quantized: bool) -> tuple[int, int]:
    """(bytes the weights hold resident during training, extra bytes while they load) on a
    CPU. Tensors kept in the file's dtype are views of the memory-mapped checkpoint, and then
    the whole mapped file stays resident for the run; converted tensors are copies, and the
    mapped file is only resident while they are made."""
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
    if mostly("F32"):  # embeddings, norms and biases are kept in fp32
        copied -= (weights.total_params - weights.linear_params) * 4
        views = True
    copied = max(0, copied)
    if views:
        return total_file + copied, 0
    return copied, total_file
