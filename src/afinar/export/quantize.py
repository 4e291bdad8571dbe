"""Quantisation types below 8 bits (q4_K_M, q5_K_M, ...) through llama.cpp's own quantiser
(`llama_model_quantize` in llama-cpp-python): k-quants need llama.cpp's importance-aware block
search, which the `gguf` package does not implement.
"""

from __future__ import annotations

from pathlib import Path

from afinar.errors import AfinarError
from afinar.export.llama_runner import require_llama_cpp

# afinar name -> llama.cpp file type constant name
LLAMA_CPP_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}


def quantize_with_llama_cpp(source: Path, target: Path, kind: str, threads: int = 0,
                            notify=None) -> None:
    """Quantises in a child process (llama_child.py): a crash there is an error, not the end."""
    from afinar.export.llama_child import run_llama_task

    require_llama_cpp(f"the {kind} type (llama.cpp's quantiser)")
    run_llama_task({"task": "quantize", "source": str(source), "target": str(target),
                    "kind": kind, "threads": threads}, f"quantising {source.name} to {kind}",
                   notify)


def quantize_in_process(source: Path, target: Path, kind: str, threads: int = 0) -> None:
    llama_cpp = require_llama_cpp(f"the {kind} type (llama.cpp's quantiser)")
    ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[kind.lower()], None)
    if ftype is None:
        raise AfinarError(f"this llama-cpp-python has no {kind} quantisation")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0 or not target.is_file():
        raise AfinarError(f"llama.cpp's quantiser failed ({code}) making {kind} from {source}")
