"""afinar: fine-tune open LLMs from a JSONL file of examples.

    import afinar
    report = afinar.validate("data.jsonl")
    result = afinar.fine_tune(afinar.TrainConfig(data="data.jsonl"))   # afinar.train: the same
    model = afinar.load(result.run_dir)                      # transformers, in this process
    model.generate([[{"role": "user", "content": "Hola"}]])
    model = afinar.open_model(result.run_dir, engine="auto") # llama.cpp on a CPU; .close()
    report = afinar.evaluate(result.run_dir)          # base vs tuned; report.json/.html
    afinar.export(result.run_dir, to="gguf", quant="q8_0")   # verified against the run
"""

from __future__ import annotations

import logging as _logging
import os as _os

# OpenMP threads that wait for work sleep instead of spinning. Alone, a run is as fast either
# way; beside another busy process (`afinar serve` chats while its worker trains; a user's
# other programs) spinning threads steal each other's cores. Measured on 2 cores, training and
# generating at once, all threads each: training kept 14% of its solo tokens/s and generation
# 12% with libgomp's default policy, 56% and 81% with this one (bench/bench_share_cores.py).
# It must be set before torch loads OpenMP; a user's own setting wins. AFINAR_SET_OMP_WAIT_POLICY
# marks it as afinar's (child processes inherit both), so that llama-server children get the
# policy the user had instead (afinar.engines.llama_server.child_environment).
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ["AFINAR_SET_OMP_WAIT_POLICY"] = "1"


def _drop_bitsandbytes_kernels_notice(record) -> bool:
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-")


# peft imports bitsandbytes whenever it is installed, so every LoRA run (not only 4-bit ones)
# imports it; on an AVX512-BF16 CPU that import tries the `kernels` package (which downloads
# binaries from the Hugging Face hub) and logs "Failed to load CPU gemm_4bit_forward from
# kernels-community" without it. That kernel only runs on 4-bit layers repacked for CPU
# inference, which load_quantized turns off, and inference de-quantises: measured, 0 calls in
# a 4-bit run's steps, held-out evaluations and generation. Only that one message is dropped;
# getLogger makes the logger bitsandbytes will log to, even before bitsandbytes is imported.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_kernels_notice)

__version__ = "0.1.0"

__all__ = ["TrainConfig", "fine_tune", "train", "load", "open_model", "validate", "evaluate",
           "export", "GenerationSettings", "AfinarError"]


def __getattr__(name: str):
    # Lazy: `import afinar` stays fast (torch and transformers load only when used).
    if name == "TrainConfig":
        from afinar.config import TrainConfig
        return TrainConfig
    if name in ("fine_tune", "train"):
        # The whole pipeline ([tune] → train → record → evaluate → card); `train` is its
        # original name. The training recipe alone is afinar.train.recipe.train.
        from afinar.pipeline import fine_tune
        # Importing the pipeline binds the subpackage afinar.train here, which would shadow
        # this function for `from afinar import train`: bind the function instead.
        globals().update(fine_tune=fine_tune, train=fine_tune)
        return fine_tune
    if name == "load":
        from afinar.infer.generate import load
        return load
    if name == "open_model":
        from afinar.engines import open_model
        return open_model
    if name == "GenerationSettings":
        from afinar.infer.generate import GenerationSettings
        return GenerationSettings
    if name == "validate":
        from afinar.data.validate import load_examples
        return load_examples
    if name == "evaluate":  # the evaluation, then the run's registry version and card
        from afinar.pipeline import evaluate_run
        return evaluate_run
    if name == "export":
        from afinar.export.exporter import export
        return export
    if name == "AfinarError":
        from afinar.errors import AfinarError
        return AfinarError
    raise AttributeError(name)
