"""Where afinar keeps its own files: AFINAR_HOME (default ~/.cache/afinar)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def afinar_home() -> Path:
    home = os.environ.get("AFINAR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "afinar"


def models_cache() -> Path:
    return afinar_home() / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Streams the file: data sets and weights can be larger than memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
