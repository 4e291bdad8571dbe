"""The recipe's run stage, top to bottom: epochs → steps → held-out evaluations → checkpoints.

    run_steps(session)      # train/recipe.py built the session: model, objective, optimizer...

What a step optimises (SFT, DPO, ORPO) is the objective's (train/objectives.py); the loop is the
same for all of them. After each step it writes the metrics record (metrics.jsonl and the
tracking tools), sends a "step" event, asks the run's control whether to pause or cancel
(train/control.py), evaluates and checkpoints when due.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from afinar.data.batching import plan_batches
from afinar.events import Checkpoint, Eval, Start, Step
from afinar.train import sharding
from afinar.train import state as ckpt
from afinar.train.control import Stopped
from afinar.train.session import Session


def run_steps(s: Session) -> None:
    """Every step from the session's state (0, or a resumed checkpoint's) to the end."""
    schedule, state, config = s.schedule, s.state, s.config
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    s.emit(Start(run_dir=str(s.run), total_steps=schedule.total_steps, epochs=s.epochs,
                 steps_per_epoch=schedule.steps_per_epoch, train_examples=len(s.data.train),
                 held_out_examples=len(s.data.held), trainable_params=s.counts[0],
                 total_params=s.counts[1], learning_rate=s.lr, precision=s.precision,
                 device=str(s.accelerator.device), processes=world,
                 start_step=state.global_step, data_report=s.data.report))
    if state.global_step == 0 and s.data.held:
        evaluate_held_out(s)  # the base model's held-out loss: the number training must beat
    clock = _Clock(time.perf_counter(), state.global_step)
    done = state.global_step >= schedule.total_steps
    while not done and state.epoch < s.epochs:
        members = schedule.members(state.epoch)
        batches = plan_batches([s.objective.length(schedule.pool[i]) for i in members],
                               config.batch_size, config.seed, state.epoch)
        batches = [[members[i] for i in b]
                   for b in batches[: schedule.micro_per_epoch * world][rank::world]]
        for step_idx in range(state.step_in_epoch, schedule.steps_per_epoch):
            ga = config.gradient_accumulation_steps
            group = [s.objective.collate([schedule.pool[i] for i in b], s.tokenizer.pad_token_id)
                     for b in batches[step_idx * ga:(step_idx + 1) * ga]]
            record = _step(s, group, clock, step_idx)
            if _after_step(s, record, clock):
                done = True
                break
        else:
            state.epoch += 1
            state.step_in_epoch = 0
    s.accelerator.wait_for_everyone()
    state.elapsed_s += time.perf_counter() - clock.started


@dataclass
class _Clock:
    started: float  # perf_counter at the run stage's start (this process)
    start_step: int  # the step it started from (a resumed run's checkpoint)
    step_tokens: int = 0  # tokens of the step under way, this process
    elapsed: float = 0.0  # seconds from `started` to the end of the last step


def _step(s: Session, group: list[dict], clock: _Clock, step_idx: int) -> dict:
    """One optimizer step over a group of micro-batches (the epoch's step `step_idx`);
    returns its metrics record."""
    accelerator, objective, state, config = s.accelerator, s.objective, s.state, s.config
    world = accelerator.num_processes
    # The loss's denominators over the whole accumulated batch on all processes (SFT: weighted
    # target tokens, and plain ones for accuracy; DPO: pairs).
    local = torch.tensor([objective.denominators(g) for g in group], dtype=torch.float64,
                         device=accelerator.device).sum(0)
    local = accelerator.reduce(local, "sum") if world > 1 else local
    n_target, n_plain = local[0].item(), local[1].item()
    step_started = time.perf_counter()
    sums = None
    for k, batch in enumerate(group):
        batch = {key: v.to(accelerator.device) for key, v in batch.items()}
        sync = sharding.accumulating(accelerator, s.loss_model, last=k == len(group) - 1)
        with sync, accelerator.autocast():
            loss, stats = objective.loss(s.loss_model, batch, n_target, n_plain)
            # DDP averages gradients over processes, hence the * world.
            accelerator.backward(loss * world)
        sums = stats if sums is None else sums + stats
        clock.step_tokens += int(batch["attention_mask"].sum())
    grad_norm = None
    if config.max_grad_norm:
        grad_norm = float(accelerator.clip_grad_norm_(s.trainable, config.max_grad_norm))
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    if world > 1:
        sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
    state.step_seconds += time.perf_counter() - step_started
    state.global_step += 1
    state.step_in_epoch = step_idx + 1
    step_metrics = objective.record(sums, n_target, n_plain)
    s.last_train_loss = step_metrics["train_loss"]
    clock.elapsed = time.perf_counter() - clock.started
    state.tokens_seen += clock.step_tokens * world
    clock.step_tokens = 0
    return {"type": "train", "step": state.global_step,
            "epoch": round(state.epoch + state.step_in_epoch / s.schedule.steps_per_epoch, 4),
            **step_metrics,
            "learning_rate": s.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "tokens_per_s": state.tokens_seen / max(1e-9, state.step_seconds),
            "tokens_seen": state.tokens_seen,
            "elapsed_s": round(state.elapsed_s + clock.elapsed, 3)}


def _after_step(s: Session, record: dict, clock: _Clock) -> bool:
    """Metrics, the step event, a held-out evaluation and a checkpoint when due; True when the
    run ends here (its last step, or early stopping)."""
    state, schedule, config = s.state, s.schedule, s.config
    s.metrics.write(record)
    done_steps = state.global_step - clock.start_step
    s.emit(Step(record["step"], record["epoch"],
                {k: v for k, v in record.items() if k not in ("type", "step", "epoch")},
                schedule.total_steps,
                clock.elapsed / done_steps * (schedule.total_steps - state.global_step)))
    request = s.control.requested()
    # Only rank 0 holds the control (the others' never asks); a checkpoint is collective, so a
    # multi-process run stops without one.
    if request == "cancel" or (request == "pause" and s.accelerator.num_processes > 1):
        raise Stopped(request, state.global_step)
    pausing = request == "pause"
    stop = state.global_step >= schedule.total_steps
    if s.data.held and (state.global_step % schedule.eval_steps == 0 or stop):
        evaluate_held_out(s)
        if (config.early_stopping_patience
                and state.evals_without_improvement >= config.early_stopping_patience):
            state.stopped_early = stop = True
            s.say(f"early stopping at step {state.global_step}: held-out loss has not "
                  f"improved for {state.evals_without_improvement} evaluations (best "
                  f"{state.best_eval_loss:.4f} at step {state.best_step})")
    if state.global_step % schedule.save_steps == 0 or stop or pausing:
        _checkpoint(s, clock)
    if pausing:
        raise Stopped("pause", state.global_step)
    return stop


def _checkpoint(s: Session, clock: _Clock) -> None:
    """Every rank gathers (shards, RNG states); rank 0 writes. The saved elapsed time includes
    the run so far; the state's own stays as it was (the stage adds its time at the end)."""
    state = s.state
    saved_weights, saved_optimizer, saved_rng = sharding.gather_checkpoint(
        s.accelerator, s.loss_model, s.model, s.optimizer, s.run, state.global_step)
    if not s.main:
        return
    state_elapsed = state.elapsed_s
    state.elapsed_s += time.perf_counter() - clock.started
    saved = ckpt.save_checkpoint(s.run, state, saved_weights, saved_optimizer, s.scheduler,
                                 keep=s.config.keep_checkpoints, rng_ranks=saved_rng)
    s.emit(Checkpoint(state.global_step, str(saved), s.last_train_loss))
    state.elapsed_s = state_elapsed


def evaluate_held_out(s: Session) -> dict:
    """The held-out loss now; keeps the best weights (checkpoints/best) when it improved."""
    state = s.state
    result = s.objective.evaluate(s.loss_model, s.data.held, s.config.batch_size,
                                  s.tokenizer.pad_token_id, s.accelerator)
    result["step"] = state.global_step
    s.metrics.write({"type": "eval", **result})
    improved = state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss - 1e-4
    if improved:
        state.best_eval_loss, state.best_step = result["eval_loss"], state.global_step
        state.evals_without_improvement = 0
        weights = sharding.full_weights(s.accelerator, s.loss_model, s.model)  # all ranks
        if s.main:
            save_folder_atomic(s.accelerator.unwrap_model(s.loss_model).model,
                               ckpt.checkpoints_dir(s.run) / "best", weights)
    else:
        state.evals_without_improvement += 1
    state.history.append((state.global_step, s.last_train_loss, result["eval_loss"]))
    warn_overfitting(state.history, s.say)
    s.emit(Eval(state.global_step, {k: v for k, v in result.items() if k != "step"},
                state.best_eval_loss, state.best_step))
    return result


def warn_overfitting(history: list, say) -> None:
    """Held-out loss rising for two evaluations in a row while training loss falls."""
    if len(history) < 3:
        return
    (_, t0, e0), (_, t1, e1), (step, t2, e2) = history[-3:]
    if None in (t0, t1, t2):
        return
    if e2 > e1 > e0 and t2 < t1 < t0:
        say(f"possible overfitting at step {step}: held-out loss rose ({e0:.3f} → {e2:.3f}) while "
            f"training loss fell ({t0:.3f} → {t2:.3f}); the best checkpoint is kept", "warning")


def save_folder_atomic(model, dest: Path, state_dict: dict | None = None) -> None:
    """`state_dict`: full tensors gathered from a sharded model (None: read the model)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    model.save_pretrained(tmp, safe_serialization=True,
                          **({"state_dict": state_dict} if state_dict is not None else {}))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
