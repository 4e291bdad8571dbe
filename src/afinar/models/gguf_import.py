"""Converts a GGUF file into a cached safetensors folder once, so later loads take under a second.

transformers dequantises GGUF on load (tens of seconds); doing that on every run would make the
embedded model feel slow, so the result is saved under AFINAR_HOME keyed by the file's sha256.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from afinar.errors import AfinarError
from afinar.paths import models_cache, sha256_file

_MARKER = "afinar-source.json"


def cached_folder(gguf_path: Path, name: str | None = None, expected_sha256: str | None = None,
                  notify=print) -> Path:
    """The converted folder for `gguf_path`, converting it first if needed."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise AfinarError(f"{gguf_path}: GGUF file not found")
    # Cheap check first: a converted folder records the source's size and mtime, so a warm load
    # does not hash 100 MB on every start.
    folder = models_cache() / (name or f"gguf-{gguf_path.stem}")
    stat = gguf_path.stat()
    marker = folder / _MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("size") == stat.st_size and info.get("mtime") == stat.st_mtime and (
                expected_sha256 is None or info.get("sha256") == expected_sha256):
            return folder

    digest = sha256_file(gguf_path)
    if expected_sha256 and digest != expected_sha256:
        raise AfinarError(f"{gguf_path}: sha256 {digest} does not match the expected "
                          f"{expected_sha256}", "reinstall the package that ships this file")
    if name is None:
        folder = models_cache() / f"gguf-{digest[:16]}"
        marker = folder / _MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("sha256") == digest:
            return folder
    notify(f"Converting {gguf_path.name} to safetensors (once; about 30 s) -> {folder}")
    _convert(gguf_path, folder, {"source": str(gguf_path), "sha256": digest,
                                 "size": stat.st_size, "mtime": stat.st_mtime})
    return folder


def _convert(gguf_path: Path, folder: Path, info: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, **kwargs)
        # The weights are dequantised now; without this, save_pretrained would record a GGUF
        # quantisation that the saved safetensors do not have.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(info, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)  # atomic: a half-converted folder never looks complete
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
