"""Hugging Face weights → GGUF, with the `gguf` package's writer and constants (no converter
script from llama.cpp, so a change in llama.cpp's scripts cannot break afinar's export).

    write_model_gguf(model, tokenizer, stop_ids, "model-f16.gguf", "f16", name="soporte")
    write_adapter_gguf(adapter_folder, base_config, "adapter-f16.gguf", "f16")

The types written here directly are f32, f16, bf16 and q8_0. Smaller ones (q4_K_M, ...) are made
from an f32/f16 file by llama.cpp's own quantiser (see quantize.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from afinar.errors import AfinarError
from afinar.export import gguf_arch
from afinar.export.gguf_vocab import build_vocab, write_vocab

DIRECT_TYPES = ("f32", "f16", "bf16", "q8_0")


def _ggml_type(kind: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]


def _file_type(kind: str):
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]


def encode_tensor(data: np.ndarray, kind: str) -> tuple[np.ndarray, object | None, str]:
    """(array to write, raw ggml type or None, the type actually used). Vectors (norms, biases)
    stay f32 as llama.cpp expects; q8_0 needs rows divisible by its 32-value block."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim == 1 or kind == "f32":
        return data, None, "f32"
    if kind == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[_ggml_type("q8_0")][0]:
        kind = "f16"  # a row length q8_0 cannot block: keep it exact-ish rather than fail
    if kind == "f16":
        return data.astype(np.float16), None, "f16"
    qtype = _ggml_type(kind)
    return gguf.quants.quantize(data, qtype), qtype, kind


def _numpy(tensor) -> np.ndarray:
    return tensor.detach().to("cpu").float().numpy()


def write_model_gguf(model, tokenizer, stop_ids: list[int], path: Path, kind: str, name: str,
                     metadata: dict[str, str] | None = None,
                     on_tensor: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Writes `model` (a merged HF causal LM) to `path`; returns how many tensors got each type."""
    import gguf

    if kind not in DIRECT_TYPES:
        raise AfinarError(f"unknown GGUF type {kind!r}", "use one of: " + ", ".join(DIRECT_TYPES))
    config = model.config
    spec = gguf_arch.arch_for(config)
    arch = getattr(gguf.MODEL_ARCH, spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    vocab = build_vocab(tokenizer, config.vocab_size, stop_ids)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    gguf_arch.write_hparams(writer, config)
    writer.add_file_type(_file_type(kind))
    if kind == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)

    state = {k: v for k, v in model.state_dict().items() if not gguf_arch.skip_tensor(k, config)}
    counts: dict[str, int] = {}
    for done, (hf_name, tensor) in enumerate(state.items(), start=1):
        data = _numpy(tensor)
        heads = gguf_arch.qk_heads(hf_name, config) if spec.permute_qk else None
        if heads:
            data = gguf_arch.rotary_to_pairs(data, heads)
        array, raw, used = encode_tensor(data, kind)
        writer.add_tensor(gguf_arch.gguf_tensor_name(name_map, hf_name), array, raw_dtype=raw)
        counts[used] = counts.get(used, 0) + 1
        if on_tensor:
            on_tensor(done, len(state))
    _finish(writer)
    return counts


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _adapter_parts(key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' -> ('X.weight', 'a')."""
    for side in ("A", "B"):
        marker = f".lora_{side}.weight"
        if key.endswith(marker):
            return key.removeprefix("base_model.model.")[: -len(marker)] + ".weight", side.lower()
    return None


def write_adapter_gguf(adapter_dir: Path, config, path: Path, kind: str, name: str) -> int:
    """A PEFT LoRA adapter as a llama.cpp LoRA adapter (`llama-cli -m base.gguf --lora X`).
    Returns the number of adapted weights."""
    import gguf
    from safetensors.numpy import load_file

    if kind not in ("f32", "f16"):
        raise AfinarError(f"a GGUF adapter is written as f32 or f16, not {kind!r}")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if adapter_config.get("use_dora"):
        raise AfinarError("llama.cpp has no DoRA adapters", "export --to gguf (merged) instead")
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= rank ** 0.5  # llama.cpp scales by alpha/r; rsLoRA by alpha/sqrt(r)
    spec = gguf_arch.arch_for(config)
    arch = getattr(gguf.MODEL_ARCH, spec.gguf_arch)
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    pairs = 0
    for key in sorted(tensors):
        parts = _adapter_parts(key)
        if parts is None:
            raise AfinarError(f"the adapter has a tensor llama.cpp adapters cannot hold: {key}",
                              "export --to gguf (merged) instead")
        hf_name, side = parts
        data = tensors[key].astype(np.float32)
        heads = gguf_arch.qk_heads(hf_name, config) if spec.permute_qk else None
        if heads and side == "b":  # B's rows are the Q/K output rows: same reordering
            data = gguf_arch.rotary_to_pairs(data, heads)
        base = gguf_arch.gguf_tensor_name(name_map, hf_name)
        writer.add_tensor(f"{base}.lora_{side}", data.astype(np.float16 if kind == "f16"
                                                             else np.float32))
        pairs += side == "a"
    _finish(writer)
    return pairs
