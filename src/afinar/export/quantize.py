"""Quantisation types below 8 bits (q4_K_M, q5_K_M, ...) through llama.cpp's own quantiser
(`llama_model_quantize` in llama-cpp-python): k-quants need llama.cpp's importance-aware block
search, which the `gguf` package does not implement. It runs in a child process
(llama_child.py, which calls llama_runner.quantize_in_process there).
"""

from __future__ import annotations

from pathlib import Path

from afinar.export.llama_runner import require_llama_cpp


def quantize_with_llama_cpp(source: Path, target: Path, kind: str, threads: int = 0,
                            notify=None) -> None:
    """Quantises in a child process (llama_child.py): a crash there is an error, not the end."""
    from afinar.export.llama_child import run_llama_task

    require_llama_cpp(f"the {kind} type (llama.cpp's quantiser)")
    run_llama_task({"task": "quantize", "source": str(source), "target": str(target),
                    "kind": kind, "threads": threads}, f"quantising {source.name} to {kind}",
                   notify)
