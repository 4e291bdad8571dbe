"""Where afinar keeps its own files: AFINAR_HOME (default ~/.cache/afinar)."""

from __future__ import annotations

import os
from pathlib import Path


def afinar_home() -> Path:
    home = os.environ.get("AFINAR_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "afinar"


def models_cache() -> Path:
    return afinar_home() / "models"
