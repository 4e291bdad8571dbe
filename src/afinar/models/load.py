"""Loads tokenizers and models from a ResolvedModel; chooses device and precision.

Mixed precision is chosen by measurement of what the hardware can do, not by habit: on a CPU
without native bf16 (no AVX512-BF16/AMX) bf16 matmuls are several times slower than fp32.
"""

from __future__ import annotations

import torch

from afinar.errors import AfinarError
from afinar.models.registry import ResolvedModel, hub_error

# Tokens that end a turn in the common chat templates; used as extra stop tokens when present.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise hub_error(source, exc) from None
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
        raise hub_error(resolved.weights, exc) from None
    return model.to(device)


def load_inference_base(resolved: ResolvedModel):
    """The fp32 weights, on the CPU, that a run's adapter is merged into (a model's own weights
    for anything else). A QLoRA run's base is quantised as training quantised it, then
    de-quantised: its adapter learned to correct those weights, not the original ones."""
    if resolved.quantization == "none":
        return merge_adapters(load_causal_lm(resolved, torch.device("cpu")),
                              resolved.merged_adapters)
    from afinar.models.quantize import load_dequantized

    return load_dequantized(resolved, resolved.quantization,
                            COMPUTE_DTYPES.get(resolved.precision, torch.float32))


def merge_adapters(model, folders):
    """`model` with each LoRA adapter folder merged into its weights, in order."""
    from afinar.models.adapters import load_adapter

    for folder in folders:
        model = load_adapter(model, folder, merge=True)
    return model


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def frozen_linear_dtype(method: str, dora: bool, precision: str):
    """The dtype frozen linear weights are stored in for training; None = fp32.

    LoRA under bf16/fp16 keeps them in the compute dtype: autocast would otherwise recast each
    fp32 weight at every matmul, and the fp32 copies cost twice the memory. Full fine-tuning
    keeps fp32 master weights (they are trained); DoRA computes its magnitudes from the base
    weights, so they stay fp32 too and its numbers stay as they were."""
    if method != "lora" or dora:
        return None
    return COMPUTE_DTYPES.get(precision)


def _fp32_names(model_class, config) -> list[str]:
    """Parameters that are not frozen linear weights: embeddings (tied to the head in many
    models), norms, biases. Read from the architecture on the meta device."""
    from afinar.models.shape import linear_weights

    with torch.device("meta"):
        meta = model_class(config)
    linear = {id(m.weight) for m in linear_weights(meta)}
    return [name for name, param in meta.named_parameters() if id(param) not in linear]


def load_training_model(resolved: ResolvedModel, frozen_dtype=None, quantization: str = "none",
                        compute_dtype=torch.float32, gradient_checkpointing: bool = False,
                        device: torch.device | None = None):
    """The model a run trains, on the CPU (accelerate places it):

    - quantization 4bit/8bit: bitsandbytes layers on `device` (see models/quantize.py), with
      gradient checkpointing set up as peft's k-bit preparation does it;
    - frozen_dtype bf16/fp16: linear weights read straight into that dtype, everything else in
      fp32 with the checkpoint's exact values, so the fp32 copy never exists (peak memory is the
      bf16 model, not the fp32 one); the same numbers as fp32 weights under autocast, which
      rounds each weight the same way at every matmul;
    - otherwise fp32.
    """
    if resolved.adapters_to_merge:
        # Starting from a LoRA run (SFT, then DPO): its adapters are merged into the base
        # weights in memory; this run's adapter trains on top of that model.
        if quantization != "none" or resolved.quantization != "none":
            raise AfinarError("starting a run from a LoRA run's model needs unquantised weights",
                              "use quantization none, or start from the base model")
        model = merge_adapters(load_causal_lm(resolved, torch.device("cpu")),
                               resolved.adapters_to_merge)
        if frozen_dtype is not None:
            from afinar.models.shape import linear_weights

            for module in linear_weights(model):
                module.weight.data = module.weight.data.to(frozen_dtype)
        return model
    if quantization != "none":
        from afinar.models.quantize import load_quantized

        # bitsandbytes layers are placed at load time: they cannot be moved afterwards.
        return load_quantized(resolved, quantization, compute_dtype, gradient_checkpointing,
                              str(device or "cpu"))
    if frozen_dtype is None:
        return load_causal_lm(resolved, torch.device("cpu"))
    import re

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(resolved.weights)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError) as exc:
        raise hub_error(resolved.weights, exc) from None
    # transformers' own mechanism for parameters that must stay fp32 when a model loads in
    # bf16/fp16, given the exact names for the duration of this load.
    previous = model_class.__dict__.get("_keep_in_fp32_modules_strict")
    model_class._keep_in_fp32_modules_strict = [
        "^" + re.escape(name) + "$" for name in _fp32_names(model_class, config)]
    try:
        return load_causal_lm(resolved, torch.device("cpu"), dtype=frozen_dtype)
    finally:
        if previous is None:
            del model_class._keep_in_fp32_modules_strict
        else:
            model_class._keep_in_fp32_modules_strict = previous


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations
    (about a third more compute per step for a fraction of the activation memory)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        # With frozen embeddings no input of a checkpointed layer needs a gradient; this hook
        # makes one, so the LoRA weights inside still get theirs.
        model.enable_input_require_grads()
