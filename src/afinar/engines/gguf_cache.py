"""The GGUF files the llama.cpp engine answers from, converted once by llama.cpp's own converter
and kept under AFINAR_HOME/cache/gguf:

    files = engine_files(resolved, tokenizer, stop_ids, notify)
    files.model      # the base model (or a run's merged weights) as f16/bf16 GGUF
    files.adapter    # the run's LoRA as an f32 GGUF adapter, or None

- A base model is converted once per (weights' sha256, llama.cpp version, type): every run of it
  and every checkpoint shares that file, and a new fine-tune needs only its adapter (seconds).
  "The base" is what the run's adapter was trained on: for a QLoRA run the quantised then
  de-quantised weights, for a run stacked on another (SFT, then DPO) the merged weights below it;
  both are part of the key.
- A run's LoRA becomes a GGUF adapter (f32: small, and no rounding of what was trained).
- What llama.cpp cannot apply as an adapter (DoRA, whole trained modules, a LoRA on a tied head;
  export/llama_cpp_limits.py) answers through the run's merged weights, converted once.

The weight type is bf16 where the CPU computes it natively (AVX512-BF16, AMX), f16 elsewhere;
AFINAR_ENGINE_GGUF_TYPE=f32|f16|bf16 overrides it. Files appear at their final name only once
complete, and a file lock keeps two processes from converting the same model at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from afinar import rundir
from afinar.errors import AfinarError
from afinar.export.convert import convert_adapter, convert_model, find_converter
from afinar.export.llama_cpp_limits import adapter_for_llama_cpp, check_adapter, check_model_config
from afinar.export.llama_runner import cpu_flags
from afinar.export.merged import converter_folder
from afinar.models.registry import ResolvedModel
from afinar.paths import afinar_home, sha256_file

TYPE_ENV = "AFINAR_ENGINE_GGUF_TYPE"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class EngineFiles:
    model: Path
    adapter: Path | None
    how: str  # "base model", "base model + LoRA adapter", "merged weights"
    converted_by: str


def gguf_type(flags: set[str] | None = None) -> str:
    chosen = os.environ.get(TYPE_ENV)
    if chosen:
        if chosen not in ("f32", "f16", "bf16"):
            raise AfinarError(f"{TYPE_ENV}={chosen}: expected f32, f16 or bf16")
        return chosen
    flags = cpu_flags() if flags is None else flags
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "f16"


def cache_dir() -> Path:
    return afinar_home() / "cache" / "gguf"


def _weight_files(folder: str | Path | None) -> list[Path]:
    if folder is None or not Path(folder).exists():
        raise AfinarError(f"{folder}: not a local model folder; the llama.cpp engine converts "
                          "local weights (download the model first, or use --engine "
                          "transformers)")
    root = Path(folder)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)


def weights_digest(folder: str | Path | None) -> str:
    """sha256 over the folder's weight files, remembered by (path, size, mtime): a 16 GB model
    is read once, not at every start."""
    index_file = cache_dir() / "digests.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    digest, changed = hashlib.sha256(), False
    for path in _weight_files(folder):
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in index:
            index[key], changed = sha256_file(path), True
        digest.update(f"{path.name}:{index[key]}".encode())
    if changed:
        rundir.write_json_atomic(index_file, index)
    return digest.hexdigest()


@contextmanager
def _locked(target: Path):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _base_key(resolved: ResolvedModel, kind: str, version: str) -> str:
    return _key("base", weights_digest(resolved.weights), resolved.quantization,
                resolved.precision if resolved.quantization != "none" else None,
                [weights_digest(folder) for folder in resolved.merged_adapters], kind, version)


def _convert_loaded(model, tokenizer, stop_ids, resolved, target: Path, kind: str, label: str,
                    notify: Callable[[str], None]) -> Path:
    check_model_config(model.config)
    with tempfile.TemporaryDirectory(prefix="afinar-engine-", dir=target.parent) as scratch:
        folder = converter_folder(model, tokenizer, stop_ids, Path(scratch) / "hf", resolved)
        convert_model(folder, target, kind, {"afinar.engine": label}, notify, name=label)
    return target


def base_gguf_path(resolved: ResolvedModel) -> Path:
    """Where the GGUF of what the run's adapter applies to is (or will be) cached; AfinarError
    when llama.cpp cannot run that model."""
    from transformers import AutoConfig

    check_model_config(AutoConfig.from_pretrained(resolved.weights))  # refuse before any work
    converter, kind = find_converter(), gguf_type()
    return cache_dir() / "base" / f"{_base_key(resolved, kind, converter.version)}-{kind}.gguf"


def base_gguf(resolved: ResolvedModel, tokenizer, stop_ids, notify: Callable[[str], None]) -> Path:
    """The weights the run's adapter applies to, as GGUF (converted at the first use)."""
    target = base_gguf_path(resolved)
    kind = target.stem.rsplit("-", 1)[-1]
    with _locked(target):
        if target.is_file():
            return target
        from afinar.models.load import load_inference_base

        notify(f"converting {resolved.base_spec} to GGUF ({kind}) for the llama.cpp engine, "
               "once; later runs and checkpoints of it reuse the file")
        model = load_inference_base(resolved)
        return _convert_loaded(model, tokenizer, stop_ids, resolved, target, kind,
                               f"{Path(str(resolved.base_spec)).name} ({kind})", notify)


def adapter_gguf(folder: Path, base_weights: str, notify: Callable[[str], None]) -> Path:
    """A PEFT LoRA folder as an f32 GGUF adapter; AfinarError when llama.cpp cannot apply it
    (adapter_for_llama_cpp checks, before converting)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_weights)
    converter = find_converter()
    key = _key("lora", weights_digest(folder), converter.version)
    target = cache_dir() / "adapters" / f"{key}.gguf"
    with _locked(target):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(prefix="afinar-adapter-", dir=target.parent) as scratch:
            staged = adapter_for_llama_cpp(folder, config, Path(scratch))
            base_config = Path(scratch) / "base-config"  # the converter reads only config.json
            config.save_pretrained(base_config)
            convert_adapter(staged, base_config, target, "f32", {}, notify)
    return target


def merged_gguf(resolved: ResolvedModel, notify: Callable[[str], None]) -> Path:
    """A run's merged weights as GGUF, for adapters llama.cpp cannot apply."""
    converter, kind = find_converter(), gguf_type()
    key = _key("merged", weights_digest(resolved.weights), weights_digest(resolved.adapter),
               resolved.quantization, [weights_digest(f) for f in resolved.merged_adapters],
               kind, converter.version)
    target = cache_dir() / "merged" / f"{key}-{kind}.gguf"
    with _locked(target):
        if target.is_file():
            return target
        from afinar.infer.generate import load

        notify(f"converting {resolved.spec}'s merged weights to GGUF ({kind}) for the llama.cpp "
               "engine, once")
        loaded = load(resolved.spec, device="cpu", notify=notify)
        return _convert_loaded(loaded.model, loaded.tokenizer, loaded.stop_ids, resolved, target,
                               kind, f"{Path(resolved.spec).name} merged ({kind})", notify)


def checkpoint_adapter_folder(checkpoint: Path, config_dir: Path, scratch: Path) -> Path:
    """A step checkpoint's LoRA tensors (state.pt) as a PEFT folder the converter reads."""
    import torch
    from safetensors.torch import save_file

    payload = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
    tensors = {key.replace(".default.", "."): value.contiguous()
               for key, value in payload["trainable"].items() if ".lora_" in key}
    folder = scratch / checkpoint.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_dir / "adapter_config.json", folder / "adapter_config.json")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def engine_files(resolved: ResolvedModel, tokenizer, stop_ids, notify: Callable[[str], None]
                 ) -> EngineFiles:
    """What llama.cpp loads to answer as `resolved` does (converting what is missing)."""
    version = find_converter().version
    adapter = Path(resolved.adapter) if resolved.adapter is not None else None
    if adapter is None:  # a model, or a full fine-tune's own weights
        return EngineFiles(base_gguf(resolved, tokenizer, stop_ids, notify), None, "base model",
                           version)
    from transformers import AutoConfig

    try:
        check_adapter(adapter, AutoConfig.from_pretrained(resolved.weights))
    except AfinarError as exc:
        notify(f"llama.cpp cannot apply this adapter as such ({exc.message}); answering from the "
               "run's merged weights")
        return EngineFiles(merged_gguf(resolved, notify), None, "merged weights", version)
    base = base_gguf(resolved, tokenizer, stop_ids, notify)
    return EngineFiles(base, adapter_gguf(adapter, resolved.weights, notify),
                       "base model + LoRA adapter", version)
