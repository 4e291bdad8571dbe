"""torch.compile for training: each decoder layer compiled once, reused by all of them.

Measured on the embedded model (SmolLM2-135M, LoRA r=16, batch 4, fp32, 2-core CPU):

| | tokens/s | peak RSS |
|---|---|---|
| eager, freed memory returned to the OS (train/host_memory.py) | 148 | 2.39 GB |
| eager, glibc's default heap | 210 | 3.12 GB |
| compiled layers, default heap | 225 | 2.39 GB |

Eager PyTorch allocates each element-wise result on its own; glibc either maps and faults every
large block afresh (slow) or keeps the freed ones in a fragmenting heap (memory). Inductor fuses
the element-wise work of a layer (norms, rotary, SiLU x up, LoRA's scaled adds) into a few
kernels, reuses its buffers and saves fewer tensors for the backward pass, so the default heap
stays compact and no step pays for page faults.

One graph serves all layers: their code is the same and parameters are graph inputs. Lengths
are marked dynamic, so batches of new lengths do not compile again.
"""

from __future__ import annotations

import shutil

import torch

# Below this estimated training time the compile (30-60 s the first time, a few seconds from
# Inductor's on-disk cache) costs more than it saves.
AUTO_MIN_TRAIN_SECONDS = 120.0


def has_cpp_compiler() -> bool:
    """Inductor's CPU backend writes C++ and builds it with the system's compiler."""
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def should_compile(setting, *, device: torch.device, world: int, quantization: str,
                   checkpointing: bool, planned_train_seconds: float, sharded: bool = False
                   ) -> tuple[bool, str]:
    """(compile or not, why) for the config's `compile` setting."""
    if setting is False:
        return False, "compile: off"
    blockers = []
    if sharded:
        blockers.append("FSDP/DeepSpeed runs are not compiled")
    if device.type != "cpu":
        blockers.append("auto compiles on CPUs only (set compile: true on a GPU)")
    if world > 1:
        blockers.append("multi-process runs are not compiled")
    if quantization != "none":
        blockers.append("quantized layers are not compiled")
    if checkpointing:
        blockers.append("gradient checkpointing is on")
    if device.type == "cpu" and not has_cpp_compiler():
        blockers.append("no C++ compiler (g++/clang++) found")
    if setting is True:
        return True, "compile: on"
    if blockers:
        return False, "compile: off (" + "; ".join(blockers) + ")"
    if planned_train_seconds < AUTO_MIN_TRAIN_SECONDS:
        return False, (f"compile: off (about {planned_train_seconds:.0f} s of training planned; "
                       f"compiling pays from about {AUTO_MIN_TRAIN_SECONDS:.0f} s)")
    return True, "compile: on (each decoder layer; the first steps wait for the compiler)"


def decoder_layers(model) -> list[torch.nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


def compile_layers(model) -> int:
    """Compiles every decoder layer in place; returns how many. A layer the compiler cannot
    handle (a missing header on a user's machine, an operator Inductor lacks) runs eagerly, with
    torch's warning, instead of failing the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
