"""DPO's reference: each pair's answer log-probs under the starting model, computed once.

The reference costs no second copy of the model: with LoRA it is the same model with the
adapter off (the base, or the merged SFT model a run started from); with full fine-tuning it is
the model before its first step. Both are only the starting point, so the values are computed
once before training, at the price of one forward pass over the data (TRL's default computes
them again at every step), and stored as RUN/reference_logps.json: a resumed run reads them
back instead of asking a model that has since been trained.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

from afinar import rundir
from afinar.events import EvalProgress
from afinar.train.objectives import reference_log_probs

REFERENCE_FILE = "reference_logps.json"


def _signature(pairs) -> list[list[int]]:
    return [[len(p.chosen.input_ids), len(p.rejected.input_ids)] for p in pairs]


def _read(file: Path, train, held) -> dict | None:
    try:
        stored = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if stored.get("signature") != [_signature(train), _signature(held)]:
        return None  # other data or settings: computed again
    return stored


def attach_reference(run: Path, data, accelerator, loss_model, model, config, pad_id: int,
                     say, emit) -> None:
    """Sets `pair.reference` on every training and held-out pair."""
    file = run / REFERENCE_FILE
    stored = _read(file, data.train, data.held) if file.is_file() else None
    if stored is None:
        module = accelerator.unwrap_model(loss_model)
        lora = config.method == "lora" and hasattr(model, "disable_adapter")
        started = time.perf_counter()
        everything = data.train + data.held
        # Forward only, nothing kept for a backward pass: twice the training micro-batch stays
        # below the training peak and runs the matmuls fuller.
        values = reference_log_probs(
            module, everything, 2 * config.batch_size, pad_id, accelerator.device,
            autocast=accelerator.autocast, adapter_off=model.disable_adapter if lora
            else nullcontext, on_progress=lambda done, total: emit(
                EvalProgress("reference log-probs", done, total)))
        stored = {"signature": [_signature(data.train), _signature(data.held)],
                  "train": values[:len(data.train)], "held": values[len(data.train):],
                  "model": "the starting model" + (" with the adapter off" if lora else ""),
                  "seconds": round(time.perf_counter() - started, 2)}
        if accelerator.is_main_process:
            rundir.write_json_atomic(file, stored)
        say(f"reference log-probs of {len(everything)} pairs ({stored['model']}) computed in "
            f"{stored['seconds']:.1f} s, once for the whole run")
    for pair, value in zip(data.train, stored["train"]):
        pair.reference = tuple(value)
    for pair, value in zip(data.held, stored["held"]):
        pair.reference = tuple(value)
