"""A model's shape from its configuration alone: no weights are read or downloaded.

    config = read_model_config("meta-llama/Llama-3.2-1B")   # the hub cache, a folder, a .gguf
    with meta_model(config) as model: ...                  # every module, no memory

The memory plan (afinar.plan) needs the exact parameter count of every linear layer, embedding
and norm of the model a user names, before anything is loaded: instantiating the architecture on
PyTorch's meta device gives exactly that for any family transformers knows, in about a second.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

from afinar.errors import AfinarError


def read_model_config(spec: str, notify: Callable = lambda message: None):
    """The transformers config of what `spec` names (a base-model name, a run directory, a
    folder, a .gguf file or a hub id), read from config files or GGUF metadata only."""
    from transformers import AutoConfig

    from afinar.models.registry import BASE_MODELS, resolve_model

    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        # transformers parses the GGUF header only (no tensors) for a config.
        return _from_pretrained(AutoConfig, str(path.parent), spec, gguf_file=path.name)
    if spec in BASE_MODELS or path.is_dir():
        spec = resolve_model(spec, notify=notify).weights
    elif spec.count("/") != 1:  # a version id or tag of the registry
        spec = resolve_model(spec, notify=notify).weights
    return _from_pretrained(AutoConfig, spec, spec)


def _from_pretrained(cls, source: str, spec: str, **kwargs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise AfinarError(
            f"cannot read the configuration of {spec!r}: {str(exc).splitlines()[0][:300]}",
            "pass a local model folder (config.json is enough for `afinar plan`), a .gguf file, "
            "or a hub id whose config.json is in the local cache"
            + (" (HF_HUB_OFFLINE=1 is set)" if offline else "")) from None


def meta_model(config, dtype=None):
    """The model `config` describes, built on the meta device: shapes and dtypes, no storage."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    except (ValueError, KeyError) as exc:
        raise AfinarError(f"transformers cannot build a causal LM from this config "
                          f"({type(config).__name__}): {str(exc).splitlines()[0][:200]}",
                          "afinar trains decoder-only causal language models") from None


def linear_weights(model) -> list:
    """The frozen-weight linear layers LoRA adapts and 4/8-bit quantisation replaces: every
    nn.Linear except the output head (and anything tied to the input embeddings)."""
    import torch

    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    skip = {id(m.weight) for m in (head, embeddings) if m is not None}
    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in skip]


def config_parameter_count(config) -> int:
    """The parameters of the model `config` describes (built on the meta device: no memory)."""
    return parameter_count(meta_model(config))


def parameter_count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total
