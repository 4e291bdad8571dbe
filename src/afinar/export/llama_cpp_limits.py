"""What llama.cpp cannot run of a trained model, refused before its converter runs.

    check_model_config(model.config)                                   # AfinarError with a hint
    folder = adapter_for_llama_cpp(run_adapter, base_config, scratch)  # or AfinarError with a hint

Models: llama.cpp's llama and qwen2 architectures attend to the whole context, and its converter
writes no sliding window for them (conversion/llama.py and qwen.py, llama.cpp 0c1e57098): a model
trained with a shorter window (Mistral v0.1) converts without complaint and then answers
differently past the window, which a short verification prompt never reaches. (This check is
kept from afinar's former GGUF writer for that reason.)

Adapters:
llama.cpp applies `W + (alpha / r) * B @ A` for each adapted weight, with one alpha per file and
r read from each tensor. So it cannot apply DoRA (a learned magnitude per output row), weights
trained in full beside the adapter (`modules_to_save`, trainable tokens), per-module alphas, or a
LoRA on an output head tied to the embeddings (the converter has no separate head to put it on).
rsLoRA scales by alpha / sqrt(r): the same update as llama.cpp's rule with alpha * sqrt(r), so
such an adapter is converted from a staged copy whose config says that alpha.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from afinar.errors import AfinarError

_MERGED_HINT = "export --to gguf or --to ollama (the adapter merged into the model) instead"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Tensor names llama.cpp's adapter converter turns into lora_a / lora_b pairs.
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def _refuse(what: str, hint: str = _MERGED_HINT) -> AfinarError:
    return AfinarError(f"a GGUF LoRA adapter cannot hold this run's adapter: {what}", hint)


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="np") as handle:
        return list(handle.keys())


def check_model_config(config) -> None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or window >= config.max_position_embeddings or (
            layer_types is not None and "sliding_attention" not in layer_types):
        return
    if config.model_type not in ("llama", "mistral", "qwen2"):
        return  # Gemma 2/3, Phi-3...: llama.cpp's architecture for them has the window
    raise AfinarError(
        f"GGUF export: this {config.model_type} model attends only to the last {window} tokens "
        "(sliding-window attention), which llama.cpp's architecture for it does not do: past "
        f"{window} tokens the GGUF file would answer differently from the trained model",
        "export --to merged works for this model (transformers applies the window)")


def check_adapter(folder: Path, base_config) -> dict:
    """The adapter's config, once it is known that llama.cpp can apply it; AfinarError if not."""
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(f"it is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        raise _refuse("it is DoRA (llama.cpp applies plain LoRA only)",
                      _MERGED_HINT + ", or train with lora.dora: false")
    if config.get("modules_to_save"):
        raise _refuse("it trains whole modules beside the LoRA (modules_to_save: "
                      f"{config['modules_to_save']})")
    if config.get("trainable_token_indices"):
        raise _refuse("it trains token embeddings (trainable_token_indices)")
    if config.get("alpha_pattern"):
        raise _refuse("it has a different alpha per module (alpha_pattern); a GGUF adapter "
                      "has one")
    if config.get("use_rslora") and config.get("rank_pattern"):
        raise _refuse("it is rsLoRA with a different rank per module: no single alpha "
                      "gives llama.cpp its scaling")
    if config.get("bias", "none") != "none":
        raise _refuse(f"it trains biases (bias: {config['bias']})")
    names = _tensor_names(folder)
    # Before the general rule: PEFT saves a tied head's embedding beside such an adapter.
    if getattr(base_config, "tie_word_embeddings", False) and any(
            ".lm_head." in n for n in names):
        raise _refuse("it adapts the output head, which this model ties to the input "
                      "embeddings (the GGUF has no separate head to adapt)")
    others = [n for n in names if not n.endswith(_LORA_SUFFIXES)]
    if others:
        raise _refuse(f"it holds weights that are not LoRA pairs ({others[0]}"
                      + (f" and {len(others) - 1} more" if len(others) > 1 else "") + ")")
    return config


def adapter_for_llama_cpp(folder: Path, base_config, scratch: Path) -> Path:
    """The folder to give llama.cpp's converter: the run's adapter, or for rsLoRA a copy in
    `scratch` whose lora_alpha is rescaled so that llama.cpp's alpha / r equals alpha / sqrt(r)."""
    config = check_adapter(folder, base_config)
    if not config.get("use_rslora"):
        return folder
    rank = int(config["r"])
    staged = scratch / "adapter-rslora-rescaled"
    staged.mkdir(parents=True, exist_ok=True)
    config = {**config, "lora_alpha": float(config["lora_alpha"]) * math.sqrt(rank),
              "use_rslora": False}
    (staged / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    try:  # the weights are only read: a link avoids copying them
        os.link(folder / ADAPTER_WEIGHTS, staged / ADAPTER_WEIGHTS)
    except OSError:
        shutil.copyfile(folder / ADAPTER_WEIGHTS, staged / ADAPTER_WEIGHTS)
    return staged
