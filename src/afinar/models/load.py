"""Loads tokenizers and models from a ResolvedModel; chooses device and precision.

Mixed precision is chosen by measurement of what the hardware can do, not by habit: on a CPU
without native bf16 (no AVX512-BF16/AMX) bf16 matmuls are several times slower than fp32.
"""

from __future__ import annotations

import torch

from afinar.errors import AfinarError
from afinar.models.registry import ResolvedModel

# Tokens that end a turn in the common chat templates; used as extra stop tokens when present.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def _hub_error(source: str, exc: Exception) -> AfinarError:
    return AfinarError(
        f"cannot load {source!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}",
        "for a hub id, the hub must be reachable (or the model cached); otherwise pass a local "
        "folder or .gguf file")


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from None
    if tokenizer.pad_token_id is None:
        # Safe even when pad == eos: afinar's labels come from explicit masks, never from
        # "token != pad", so a real EOS is never masked out (a classic never-stops bug).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_generation_config(source: str):
    """The generation config a model would load with, read without its weights (so a run can
    know its stop tokens before anything heavy is built); None when it cannot be read."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        pass
    try:  # no generation_config.json: transformers derives one from the model's config
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
    except (OSError, ValueError):
        return None


def stop_token_ids(tokenizer, model=None, generation_config=None) -> list[int]:
    """EOS plus the template's end-of-turn tokens: generation stops at any of them."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = generation_config or getattr(model, "generation_config", None)
    gen_eos = getattr(gen, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template or ""
    ids.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab and t in template)
    return sorted(ids)


def pick_device(requested: str = "auto") -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def pick_precision(requested: str, device: torch.device) -> str:
    """'fp32', 'bf16' or 'fp16' (autocast dtype; master weights stay fp32 for training)."""
    if requested == "fp16" and device.type == "cpu":
        # accelerate has no fp16 autocast on CPU: it would train in fp32 and call it fp16.
        raise AfinarError("precision fp16 is for GPUs: on a CPU it would silently run in fp32",
                          "use precision bf16 (fast on CPUs with AVX512-BF16 or AMX) or fp32, "
                          "or auto to pick")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def load_causal_lm(resolved: ResolvedModel, device: torch.device, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.weights, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise _hub_error(resolved.weights, exc) from None
    return model.to(device)


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@torch.no_grad()
def store_frozen_linears(model, precision: str) -> int:
    """Stores the weights of the model's linear layers in the autocast dtype, before LoRA is
    attached to them: autocast would otherwise recast each fp32 weight at every matmul, and the
    fp32 copies cost twice the memory. Embeddings (tied to the output head in many models),
    norms and biases stay fp32, so the residual stream stays fp32 and every matmul sees the
    same bf16 weights autocast would make (the same round-to-nearest cast); losses agree with
    the fp32-weights run to about 1e-5 relative (tests/train/test_precision.py). peft then
    keeps the LoRA weights, and so their gradients and optimizer state, in fp32. Returns the
    number of weights stored in the compute dtype."""
    dtype = COMPUTE_DTYPES.get(precision)
    if dtype is None:
        return 0
    head = model.get_output_embeddings()
    keep = {id(head.weight)} if head is not None else set()
    embeddings = model.get_input_embeddings()
    if embeddings is not None:
        keep.add(id(embeddings.weight))
    count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in keep:
            module.weight.data = module.weight.data.to(dtype)
            count += module.weight.numel()
    return count

