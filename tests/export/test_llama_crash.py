"""llama.cpp on every CPU: no repacked weights where they crash (AMX), and a native crash of
llama.cpp is an error of afinar's, never the end of afinar's process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from afinar.cli import app
from afinar.errors import AfinarError
from afinar.export import export, llama_child
from afinar.export import llama_runner as R

CRASHING_CHILD = [sys.executable, str(Path(__file__).with_name("crashing_llama_child.py"))]


@pytest.fixture(scope="module")
def run_dir(evaluated_run) -> Path:
    return evaluated_run[0].run_dir


SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}
EPYC_ZEN4 = {"avx512f", "avx512_bf16", "avx2"}
EPYC_ZEN3 = {"avx2", "fma"}


def test_repacked_weights_are_off_on_amx_cpus_only(monkeypatch):
    monkeypatch.delenv(R.REPACK_ENV, raising=False)
    assert R.use_repacked_weights(SAPPHIRE_RAPIDS) is False
    assert R.use_repacked_weights(EPYC_ZEN4) is True
    assert R.use_repacked_weights(EPYC_ZEN3) is True
    assert R.use_repacked_weights() is not bool(R.cpu_flags() & {"amx_tile", "amx_int8"})
    monkeypatch.setenv(R.REPACK_ENV, "on")
    assert R.use_repacked_weights(SAPPHIRE_RAPIDS) is True
    monkeypatch.setenv(R.REPACK_ENV, "off")
    assert R.use_repacked_weights(EPYC_ZEN3) is False
    monkeypatch.setenv(R.REPACK_ENV, "maybe")
    with pytest.raises(AfinarError, match="not a setting"):
        R.use_repacked_weights()


def test_llama_cpp_loads_with_and_without_repacked_weights(run_dir, tmp_path):
    """The setting reaches llama.cpp (its model parameters say so), and a quantised file answers
    the same either way on this CPU."""
    result = export(str(run_dir), to="gguf", quant="q4_0", output=str(tmp_path / "g"),
                    verify=False)
    path = result.output / f"{run_dir.name}-q4_0.gguf"
    answers = {}
    # Repacked weights crash llama.cpp on AMX CPUs, in this very process: there only "off" runs.
    for repack in (True, False) if R.use_repacked_weights() else (False,):
        with R.LlamaCpp(path, repack=repack) as llm:
            assert bool(llm.llm.model_params.use_extra_bufts) is repack
            ids = llm.tokenize("<|im_start|>user\npedido 3 llegó roto<|im_end|>\n"
                               "<|im_start|>assistant\n")
            answers[repack] = llm.greedy(ids, 24)
    assert answers[False] and answers.get(True, answers[False]) == answers[False]


def test_a_llama_cpp_crash_is_a_clear_error_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_child, "CHILD_COMMAND", CRASHING_CHILD)
    out = tmp_path / "crashed"
    with pytest.raises(AfinarError) as caught:
        export(str(run_dir), to="gguf", quant="q8_0", output=str(out), prompts=2)
    message = str(caught.value)
    assert "llama.cpp crashed (SIGSEGV, signal 11)" in message
    assert f"{run_dir.name}-q8_0.gguf (q8_0)" in message
    assert "pretending to be an AMX kernel" in message  # the child's last words are shown
    assert "--quant f16" in caught.value.hint and R.REPACK_ENV in caught.value.hint
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir()]  # no temporary folder, no report


def test_the_cli_survives_a_llama_cpp_crash(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(llama_child, "CHILD_COMMAND", CRASHING_CHILD)
    result = CliRunner().invoke(app, ["export", str(run_dir), "--to", "ollama", "--quant", "q8_0",
                                      "--output", str(tmp_path / "o"), "--prompts", "2"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "llama.cpp crashed (SIGSEGV, signal 11)" in text and "Traceback" not in text
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not [p.name for p in tmp_path.iterdir()]


def test_a_crash_in_the_quantiser_is_an_error_too(tmp_path, monkeypatch):
    monkeypatch.setattr(llama_child, "CHILD_COMMAND", CRASHING_CHILD)
    from afinar.export.quantize import quantize_with_llama_cpp

    with pytest.raises(AfinarError, match=r"crashed \(SIGSEGV.*quantising a.gguf to q4_k_m"):
        quantize_with_llama_cpp(tmp_path / "a.gguf", tmp_path / "b.gguf", "q4_k_m")
