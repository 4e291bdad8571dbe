"""4-bit and 8-bit base weights (QLoRA) with bitsandbytes, on CPU and CUDA.

    model = load_quantized(resolved, "4bit", torch.bfloat16)   # then LoRA on top
    dequantize_linears(model)                                   # plain nn.Linear again
    base = load_dequantized(resolved, "4bit", torch.bfloat16)  # a QLoRA run's base, for inference

4bit is QLoRA's recipe: NF4 weights with double-quantised scales, matmuls in the compute dtype.
8bit is LLM.int8(). Either way the model is then prepared for k-bit training as peft documents
(`prepare_model_for_kbit_training`: everything not quantised goes to fp32, the input embeddings
produce gradients so checkpointed layers still train their LoRA weights).

Inference and export of a QLoRA run (`load_dequantized`) fold the adapter into the DE-quantised
base weights: those are the weights the adapter was trained against, so the merged model answers
like the trained one (the original full-precision weights would not: the adapter learned to
correct the 4-bit ones). The base is quantised again on the CPU with the run's settings, from
weights in the run's precision: NF4 codes taken from bf16 weights differ from those taken from
fp32 ones (about 1% of them on the test model).
"""

from __future__ import annotations

import torch

from afinar.errors import AfinarError
from afinar.models.registry import ResolvedModel, hub_error

QUANTIZATIONS = ("none", "4bit", "8bit")


def require_bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise AfinarError("quantization 4bit/8bit needs the bitsandbytes package",
                          "pip install bitsandbytes==0.50.2 (scripts/bootstrap.sh installs it)"
                          ) from None
    return bitsandbytes


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise AfinarError(f"unknown quantization {quantization!r}",
                      "use one of: " + ", ".join(QUANTIZATIONS))


def load_quantized(resolved: ResolvedModel, quantization: str, compute_dtype: torch.dtype,
                   gradient_checkpointing: bool = False, device: str = "cpu"):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.weights, dtype=compute_dtype, device_map={"": device},
            quantization_config=quantization_config(quantization, compute_dtype))
    except (OSError, ValueError) as exc:
        raise hub_error(resolved.weights, exc) from None
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer at its first forward
            # in eval mode for a bf16 kernel, rounding its scales to bf16: evaluations during
            # training would then see other weights than the steps, and the trained weights
            # could no longer be de-quantised exactly. (It is also the only path that would use
            # the `kernels` package whose absence afinar/__init__.py keeps bitsandbytes quiet on.)
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def load_dequantized(resolved: ResolvedModel, quantization: str, compute_dtype: torch.dtype):
    """The base a QLoRA run trained against, in fp32 on the CPU with plain nn.Linear layers:
    quantised as training quantised it (same settings, from weights in the run's compute dtype),
    then de-quantised. The adapter merges into these weights like into any others."""
    model = load_quantized(resolved, quantization, compute_dtype)
    dequantize_linears(model, torch.float32)
    return model.float()  # bf16 runs: embeddings and norms were loaded (and trained) in bf16


def merge_note(quantization: str) -> str:
    """What an export of a QLoRA run says about its weights."""
    return (f"QLoRA run: the adapter is merged into the de-quantised {quantization} base weights "
            "(the weights it was trained against)")


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False)
                or getattr(model, "is_loaded_in_8bit", False))


@torch.no_grad()
def dequantize_linears(model, dtype: torch.dtype = torch.float32) -> int:
    """Replaces every bitsandbytes layer by an nn.Linear holding its de-quantised weights (the
    exact values the quantised layer trains with); returns how many were replaced."""
    bnb = require_bitsandbytes()
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                weight = _dequantized_weight(child, bnb)
                linear = torch.nn.Linear(child.in_features, child.out_features,
                                         bias=child.bias is not None, device=weight.device,
                                         dtype=dtype)
                linear.weight.copy_(weight.to(dtype))
                if child.bias is not None:
                    linear.bias.copy_(child.bias.to(dtype))
                setattr(parent, name, linear)
                count += 1
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return count


def _dequantized_weight(layer, bnb) -> torch.Tensor:
    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise AfinarError(
                "this 4-bit layer was repacked by bitsandbytes for its CPU bf16 kernel (scales "
                "rounded to bf16): the weights it trained with cannot be recovered exactly",
                "de-quantise right after loading (load_quantized turns the repacking off)")
        # In the quantised dtype, as the 4-bit matmul de-quantises before it multiplies.
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # int8: rows scaled back by their absmax (SCB) as bitsandbytes' training matmul on CPU
    # (MatMul8bitFp) does it, in the same order of operations, so the values are bit-equal.
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    return weight.data.float().mul_(scb.float().unsqueeze(1).mul(1.0 / 127.0))
