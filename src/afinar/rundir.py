"""The layout of a run directory, shared by training (writer) and loading (reader).

    RUN/run.json          status, base model, timings, final metrics (written last on success)
    RUN/config.yaml       the resolved config the run used
    RUN/data_report.json  validation report and token statistics of the training data
    RUN/metrics.jsonl     one JSON object per logged step / evaluation
    RUN/tokenizer/        tokenizer and chat template the run trained with
    RUN/adapter/          LoRA/DoRA adapter (peft format), the best checkpoint's weights
    RUN/model/            full weights instead, when method=full
    RUN/checkpoints/      resumable states (step-NNNNNN/) and best/
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
DATA_REPORT = "data_report.json"
PLAN_FILE = "plan.json"  # the memory/time plan computed before the weights loaded
METRICS_FILE = "metrics.jsonl"
TOKENIZER_DIR = "tokenizer"
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"


def is_run_dir(path: Path) -> bool:
    return (path / RUN_FILE).is_file() or (path / CONFIG_FILE).is_file() and (
        path / CHECKPOINTS_DIR).is_dir()


def read_run_info(path: Path) -> dict:
    file = path / RUN_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
    os.replace(tmp, path)


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
