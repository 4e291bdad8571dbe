"""Fixtures shared by the model-family tests (tests/models/test_family*.py import them): each
family's tiny model folder, built once per session, and a few LoRA steps trained on it, also once
per session. A plain module, not a conftest.py: `from conftest import ...` in those tests means
tests/conftest.py."""

from __future__ import annotations

import pytest
import torch

from families import build_family, find_family


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small spend their time in thread hand-offs, not in arithmetic: with two
    threads on a 2-core machine that is also running something else, measured 6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """name -> HF folder of the family's tiny model, built once per session on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_family(find_family(name), tmp_path_factory.mktemp(name))
        return built[name]
    return get


@pytest.fixture(scope="session")
def family_run(family_dir, tmp_path_factory):
    """name -> run directory of 8 LoRA steps on the family's tiny model (the test corpus'
    one-format answers), trained once per session on first use."""
    from conftest import write_jsonl

    from afinar.config import TrainConfig
    from afinar.train.recipe import train

    runs = {}

    def get(name: str):
        if name not in runs:
            folder = tmp_path_factory.mktemp(f"{name}-run")
            data = write_jsonl(folder / "data.jsonl", [{"messages": [
                {"role": "user", "content": f"pedido {i} llegó roto"},
                {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\n"
                                                 f"Respuesta: {i}"}]} for i in range(40)])
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                runs[name] = train(TrainConfig(
                    data=str(data), model=str(family_dir(name)), output=str(folder / "run"),
                    max_steps=8, batch_size=2, precision="fp32", learning_rate=1e-2, seed=0,
                    evaluate=False)).run_dir
            finally:
                torch.set_num_threads(threads)
        return runs[name]
    return get
