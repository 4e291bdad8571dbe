"""Resumable training state: what a checkpoint holds and how it is written atomically.

A checkpoint restores weights (trainable tensors), optimizer, LR scheduler, every RNG and the
data position (epoch and step within it), so a run killed with -9 and resumed ends exactly where
an uninterrupted run would. Checkpoints are written to a temp folder, flushed to disk and
renamed into place, so a folder named step-NNNNNN is complete; its state.pt's sha256 is kept
beside it, and a resume skips (and renames damaged-step-NNNNNN) a checkpoint whose bytes were
damaged since, continuing from the newest intact one.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from afinar import rundir


@dataclass
class TrainState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0
    step_seconds: float = 0.0  # time inside optimizer steps only: the basis of tokens/s
    stopped_early: bool = False
    history: list = field(default_factory=list)  # (step, train_loss, eval_loss) for diagnostics


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints_dir(run: Path) -> Path:
    return run / rundir.CHECKPOINTS_DIR


def rng_state() -> dict:
    """This process's RNG states (each process of a multi-process run has its own)."""
    return _rng_state()


def save_checkpoint(run: Path, state: TrainState, trainable: dict, optimizer_state: dict,
                    scheduler, keep: int = 1, rng_ranks: list | None = None) -> Path:
    """`trainable`: full tensors; `optimizer_state`: the optimizer's state_dict, or what
    train/sharding.py gathered from a sharded one; `rng_ranks`: every process's RNG states
    (by rank) in a multi-process run, so that dropout continues on each as if uninterrupted."""
    folder = checkpoints_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.global_step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
    torch.save({"state": asdict(state), "trainable": trainable,
                "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), **({"rng_ranks": rng_ranks} if rng_ranks else {})},
               tmp / "state.pt")
    (tmp / _DIGEST).write_text(_sha256(tmp / "state.pt"))
    for file in (tmp / "state.pt", tmp / _DIGEST, tmp):  # on disk before the name says so
        _fsync(file)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(folder)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    found = sorted(p for p in checkpoints_dir(run).glob("step-*") if (p / "state.pt").is_file())
    return found[-1] if found else None


_DIGEST = "state.sha256"


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (its state.pt changed since it was written), or
    None. Checkpoints written before digests were kept are trusted."""
    digest = checkpoint / _DIGEST
    if not (checkpoint / "state.pt").is_file():
        return "state.pt is missing"
    if digest.is_file() and digest.read_text().strip() != _sha256(checkpoint / "state.pt"):
        return "state.pt does not match the sha256 saved with it"
    return None


def intact_checkpoint(run: Path, say: Callable[..., None] | None = None) -> Path | None:
    """The newest checkpoint whose bytes are as written; damaged newer ones are renamed
    damaged-step-N (kept for a look, never resumed from) and reported through `say`. Temp
    folders of writes that never finished (a killed process, a full disk) are removed: this
    runs before the run resumes, when nothing else writes to it."""
    folder = checkpoints_dir(run)
    for partial in folder.glob(".tmp-*") if folder.is_dir() else []:
        shutil.rmtree(partial, ignore_errors=True)
    while (newest := latest_checkpoint(run)) is not None:
        reason = damage(newest)
        if reason is None:
            return newest
        aside = newest.with_name("damaged-" + newest.name)
        shutil.rmtree(aside, ignore_errors=True)
        newest.rename(aside)
        if say:
            say(f"checkpoint {newest.name} is damaged ({reason}); set aside as {aside.name}",
                "warning")
    return None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def restore(payload: dict, optimizer, scheduler, rank: int = 0, world: int = 1) -> TrainState:
    """`optimizer` None: its state was already loaded (sharded, by train/sharding.py)."""
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    ranks = payload.get("rng_ranks")
    _set_rng_state(ranks[rank] if ranks and len(ranks) == world else payload["rng"])
    return TrainState(**payload["state"])
