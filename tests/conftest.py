"""Shared fixtures. Nothing here downloads anything.

`tiny_model_dir`: a random 2-layer LlamaForCausalLM with a BPE tokenizer trained here on a small
corpus and a ChatML template (pad == eos on purpose, like SmolLM2), saved as an HF folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Re-exported: tests import the builders from conftest.
from tiny_llama import CHATML, build_tiny_model, build_tokenizer  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
# The serve tests' fixtures (`server`, `client`) live in tests/serving.py; the dashboard
# browser tests' (`dash`, `page`) in tests/browser.py; a real PostgreSQL server's
# (`postgres_server`, `postgres_url`) in tests/postgres.py.
pytest_plugins = ["serving", "browser", "postgres"]

# The embedded model's converted copy is cached here across local runs (CI converts it once).
os.environ.setdefault("AFINAR_HOME", str(ROOT / ".afinar-test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture
def small_chat_file(tmp_path) -> Path:
    """40 short conversations teaching one fixed answer format; learnable by a tiny model."""
    records = []
    for i in range(40):
        records.append({"messages": [
            {"role": "user", "content": f"pedido {i} llegó roto"},
            {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"},
        ]})
    return write_jsonl(tmp_path / "small.jsonl", records)


# Checks for the evaluated run: `always` must score 1 and `never` 0, whatever the model says.
EVAL_CHECKS = r"""checks:
  - name: format
    when: {prompt_matches: pedido}
    regex: 'Categoría: \w+\nPrioridad: \w+\nRespuesta: .*'
  - {name: always, regex: '(?s).*'}
  - {name: never, regex: 'NEVER-MATCHES'}
leak_regex: 'Prioridad:'
"""


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, tiny_model_dir):
    """(TrainResult, folder): 30 LoRA steps on a tiny random Llama, then `afinar eval`. On the
    transformers engine: the evaluation's own tests compare answers across evaluations, and
    llama.cpp's batched answers may part at a near-tie from one pass to the next
    (docs/serving.md); the llama.cpp engine's evaluation is tested in tests/engines."""
    from afinar.config import TrainConfig
    from afinar.pipeline import fine_tune

    folder = tmp_path_factory.mktemp("evaluated")
    records = [{"messages": [
        {"role": "user", "content": f"pedido {i} llegó roto"},
        {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"}]}
        for i in range(40)]
    data = write_jsonl(folder / "small.jsonl", records)
    (folder / "checks.yaml").write_text(EVAL_CHECKS, encoding="utf-8")
    config = TrainConfig(data=str(data), model=str(tiny_model_dir), output=str(folder / "run"),
                         learning_rate=1e-2, batch_size=4, max_steps=30, eval_steps=10, seed=0,
                         precision="fp32", checks=str(folder / "checks.yaml"),
                         engine="transformers")
    return fine_tune(config), folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(run dir, completed process): the README's `afinar demo` on the embedded model, run once
    per session and shared by the real-model tests (training it takes minutes)."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("demo") / "demo"
    afinar = str(Path(sys.executable).parent / "afinar")
    done = subprocess.run([afinar, "demo", "--output", str(run)], capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done
