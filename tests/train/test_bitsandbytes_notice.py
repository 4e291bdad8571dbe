"""bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" notice: printed by
no afinar run, quantised or not, because no afinar run can use the kernel it is about."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NOTICE = "kernels-community"


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_a_run_prints_no_kernels_notice(tmp_path, tiny_model_dir, small_chat_file,
                                        quantization):
    """The notice comes from `import bitsandbytes` on AVX512-BF16 CPUs only; peft imports it in
    every LoRA run. 4-bit runs are silenced too: their layers never reach that kernel (see
    test_4bit_layers_never_reach_the_kernel_the_notice_is_about)."""
    afinar = Path(sys.executable).parent / "afinar"
    run = tmp_path / "run"
    done = subprocess.run(
        [str(afinar), "train", "--data", str(small_chat_file), "--model", str(tiny_model_dir),
         "--output", str(run), "--set", "max_steps=2", "--set", "precision=fp32",
         "--set", f"quantization={quantization}", "--no-eval"],
        capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert NOTICE not in output and "gemm_4bit_forward" not in output, output[-3000:]


def test_4bit_layers_never_reach_the_kernel_the_notice_is_about(tiny_model_dir, monkeypatch):
    """The `kernels` package would only replace bitsandbytes' CPU gemv_4bit, which runs on layers
    repacked for inference at an eval-mode forward; load_quantized turns that repacking off."""
    import bitsandbytes.functional as bnb_functional

    from afinar.models.quantize import load_quantized
    from afinar.models.registry import resolve_model

    calls = []
    real = bnb_functional.gemv_4bit
    monkeypatch.setattr(bnb_functional, "gemv_4bit",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model = load_quantized(resolve_model(str(tiny_model_dir)), "4bit", torch.bfloat16).eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    assert calls == []


def test_only_that_notice_is_dropped(caplog):
    """Holds on every CPU, with or without AVX512-BF16: the filter sits on the logger's name."""
    import afinar  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                       "make sure you already `pip install kernels`", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
