"""What differs between model families in a GGUF file: the llama.cpp architecture name, its
hyperparameter keys, and how Hugging Face tensors are laid out for it.

The one subtle part is rotary embeddings. Hugging Face Llama checkpoints keep each attention
head's query/key rows in "rotate half" order (all first halves of the rotated pairs, then all
second halves). llama.cpp's `llama` architecture applies rotary embeddings to adjacent pairs
(the original Meta layout), so Q and K rows must be reordered head by head. Qwen2 uses the
"NEOX" rotary in llama.cpp, which matches Hugging Face's order: no reordering there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from afinar.errors import AfinarError


@dataclass(frozen=True)
class ArchSpec:
    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


# Keyed by the Hugging Face config's model_type (present even before a model is saved).
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("LLAMA", permute_qk=True),  # Llama 1-3, SmolLM/SmolLM2
    "mistral": ArchSpec("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as llama
    "qwen2": ArchSpec("QWEN2", permute_qk=False),
}


def arch_for(config) -> ArchSpec:
    if config.model_type not in ARCHS:
        raise AfinarError(f"GGUF export does not support the {config.model_type!r} architecture",
                          "supported: " + ", ".join(ARCHS) + "; export --to merged works for any "
                          "model")
    _check_sliding_window(config)
    return ARCHS[config.model_type]


def _check_sliding_window(config) -> None:
    """llama.cpp's llama and qwen2 architectures attend to the whole context: a model trained
    with a shorter sliding window (Mistral v0.1) would answer differently past the window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or window >= config.max_position_embeddings or (
            layer_types is not None and "sliding_attention" not in layer_types):
        return
    raise AfinarError(
        f"GGUF export: this {config.model_type} model attends only to the last {window} tokens "
        "(sliding-window attention), which llama.cpp's architecture for it does not do: past "
        f"{window} tokens the GGUF file would answer differently from the trained model",
        "export --to merged works for this model (transformers applies the window)")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise AfinarError("the model config has no rope_theta")
    return float(theta)


def write_hparams(writer, config) -> None:
    import gguf

    params = getattr(config, "rope_parameters", None) or {}
    scaling = params.get("rope_type", "default")
    if scaling not in ("default", "linear"):
        raise AfinarError(f"GGUF export does not support rope scaling {scaling!r} yet",
                          "export --to merged works for this model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    if scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def rotary_to_pairs(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorders Q/K rows (or a LoRA B matrix's rows) from HF's half-split to adjacent pairs."""
    out_dim = rows.shape[0]
    half = out_dim // n_heads // 2
    return (rows.reshape(n_heads, 2, half, *rows.shape[1:]).swapaxes(1, 2)
            .reshape(rows.shape))


def pairs_to_rotary(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of rotary_to_pairs (tests use it to compare tensors with the source)."""
    out_dim = rows.shape[0]
    half = out_dim // n_heads // 2
    return (rows.reshape(n_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2)
            .reshape(rows.shape))


def qk_heads(hf_name: str, config) -> int | None:
    """How many heads to reorder for this tensor under a permuting architecture, else None."""
    if ".self_attn.q_proj." in hf_name:
        return config.num_attention_heads
    if ".self_attn.k_proj." in hf_name:
        return config.num_key_value_heads or config.num_attention_heads
    return None


def gguf_tensor_name(name_map, hf_name: str) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise AfinarError(f"GGUF export: no llama.cpp name for the tensor {hf_name!r}",
                          "this model has parts afinar's GGUF writer does not know; "
                          "export --to merged works")
    return name


def skip_tensor(hf_name: str, config) -> bool:
    if hf_name.endswith("rotary_emb.inv_freq"):
        return True  # recomputed by llama.cpp from rope_theta
    return hf_name == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))
