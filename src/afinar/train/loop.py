"""The training loop, top to bottom: setup → steps → evaluation → checkpoints.

What a step optimises (SFT, DPO, ORPO) is the small objective piece in train/objectives.py; the
loop is the same for all of them.

    from afinar import TrainConfig, train
    result = train(TrainConfig(data="examples/soporte-triaje/data.jsonl"))

Runs single-process on CPU or GPU, and multi-process under `torchrun`/`accelerate launch`
(accelerate provides device placement, autocast and DDP; FSDP2 and DeepSpeed ZeRO with what
differs for a sharded model in train/sharding.py). Progress is reported as plain dict
events to `on_event`, so the CLI, the server and tests observe the same run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from afinar import rundir
from afinar.config import TrainConfig, auto_epochs, dump_config
from afinar.data.batching import plan_batches
from afinar.data.prepare import PreparedData, prepare_data
from afinar.data.tokenize import ChatEncoder
from afinar.errors import AfinarError
from afinar.models import adapters
from afinar.models.load import (COMPUTE_DTYPES, enable_gradient_checkpointing,
                                frozen_linear_dtype, load_tokenizer, load_training_model,
                                pick_device, pick_precision, read_generation_config,
                                stop_token_ids)
from afinar.models.registry import BASE_MODELS, resolve_model
from afinar.models.shape import read_model_config
from afinar.paths import sha256_file
from afinar.plan.run import (as_sequences, does_not_fit_error, epochs_for_steps,
                             plan_for_config)
from afinar.plan.speed import choose_precision
from afinar.train import sharding
from afinar.train import state as ckpt
from afinar.train.accelerator import make_accelerator
from afinar.train.compiled import compile_layers, should_compile
from afinar.train.host_memory import return_freed_memory
from afinar.train.objectives import make_objective
from afinar.train.reference import attach_reference
from afinar.train.replay import build_replay
from afinar.train.replay import describe as describe_replay
from afinar.train.tracking import Trackers

Event = Callable[[dict], None]


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    is_main_process: bool = True  # False on the other ranks of a multi-process run
    report: object | None = None  # the end-of-run EvalReport (afinar.evaluation), when it ran


def _default_output(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(config.data).stem}-{stamp}"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _build_optimizer(model, config: TrainConfig, lr: float):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def _build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    warmup = int(round(config.warmup_ratio * total_steps))
    return get_scheduler(name[config.lr_scheduler], optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps)


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class _Metrics:
    """metrics.jsonl writer; on resume, drops lines logged after the checkpoint. Each record
    also goes to the run's tracking tools (`report_to`), so they get the same numbers."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None,
                 trackers: Trackers | None = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers or Trackers()
        if enabled and keep_until_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if (step := _step_of(line)) is not None and step <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.trackers.log(record)


def _save_folder_atomic(model, dest: Path, state_dict: dict | None = None) -> None:
    """`state_dict`: full tensors gathered from a sharded model (None: read the model)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    model.save_pretrained(tmp, safe_serialization=True,
                          **({"state_dict": state_dict} if state_dict is not None else {}))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _write_run_info(run: Path, config: TrainConfig, status: str, **extra) -> None:
    info = rundir.read_run_info(run)
    # "lora", "full", or with a preference objective "lora dpo", "full orpo"...
    method = config.method if config.objective == "sft" else f"{config.method} {config.objective}"
    info.update({"status": status, "base_model": config.model, "method": method,
                 "data": config.data, **extra})
    info.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    info["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rundir.write_json_atomic(run / rundir.RUN_FILE, info)


def _check_input_files(config: TrainConfig) -> None:
    for key in ("data", "validation_data", "checks"):
        value = getattr(config, key)
        if value and not Path(value).is_file():
            what = "is a folder, not a file" if Path(value).is_dir() else "no such file"
            raise AfinarError(f"{value}: {what} ({key})",
                              "check the path; data files are JSONL, one example per line"
                              if key != "checks" else "check the path of the checks YAML file")


def _is_main_rank() -> bool:
    """Rank 0 (or a single process), known before accelerate sets up the process group:
    torchrun and `accelerate launch` both set RANK."""
    return os.environ.get("RANK", "0") == "0"


def train(config: TrainConfig, on_event: Event | None = None, resume: bool = False
          ) -> TrainResult:
    """Fine-tunes `config.model` on `config.data`; returns the run directory and a summary.

    A run that fails or is interrupted records that in run.json (status failed/interrupted), so
    nothing half-trained looks finished; `resume=True` continues from its last checkpoint.
    """
    trackers = Trackers.for_run(config)  # report_to: a missing library stops the run here
    started = {}
    try:
        result = _train(config, on_event, resume, started, trackers)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        trackers.finish(status)
        run = started.get("run")
        if run is not None and (run / rundir.RUN_FILE).is_file():
            _write_run_info(run, started["config"], status,
                            error=f"{exc.__class__.__name__}: {exc}"[:2000])
            _register(run, on_event)
            if on_event and (run / rundir.CHECKPOINTS_DIR).is_dir():
                on_event({"type": "log", "level": "warning", "message":
                          f"run {status}; continue it with: afinar train --resume {run}"})
        raise
    if result.is_main_process:
        _register(result.run_dir, on_event)
    if result.is_main_process and config.evaluate and result.summary.get("held_out_examples"):
        # Outside the try above: the model is trained and saved whatever happens here.
        try:
            result.report = _evaluate_run(result.run_dir, on_event)
            trackers.artifacts(result.run_dir)  # report.json/.md/.html, those it wrote
        except BaseException:
            trackers.finish("failed")
            raise
    elif result.is_main_process and config.evaluate and on_event:
        on_event({"type": "log", "level": "warning", "message": "no held-out example is left "
                  "(held_out_fraction 0, or every one longer than max_seq_length with overflow "
                  "drop): the end-of-run evaluation was skipped; run `afinar eval RUN --data "
                  "FILE` with a held-out file"})
    trackers.finish("succeeded")
    return result


def _register(run: Path, on_event: Event | None) -> None:
    """Records the run in the model-version registry; a registry problem never costs a run."""
    from afinar.train.tune import is_trial_run
    from afinar.versions import open_registry

    if is_trial_run(run):  # a search trial (RUN/tune/trial-N) is a measurement, not a version
        return
    try:
        with open_registry() as registry:
            registry.record_run(run)
    except (AfinarError, OSError, sqlite3.Error) as exc:
        if on_event:
            on_event({"type": "log", "level": "warning",
                      "message": f"could not record the run in the registry: {exc}"})


def _evaluate_run(run: Path, on_event: Event | None):
    from afinar.evaluation.evaluator import evaluate

    emit = on_event or (lambda event: None)
    try:
        return evaluate(str(run), on_event=emit, notify=lambda message: emit(
            {"type": "log", "level": "info", "message": message}))
    except AfinarError as exc:
        emit({"type": "log", "level": "warning", "message": f"end-of-run evaluation failed: "
              f"{exc.message}; the run itself is complete (retry with `afinar eval {run}`)"})
        return None


def _train(config: TrainConfig, on_event: Event | None, resume: bool, started: dict,
           trackers: Trackers) -> TrainResult:
    from accelerate.utils import set_seed

    emit = on_event or (lambda event: None)

    def say(message: str, level: str = "info") -> None:
        emit({"type": "log", "level": level, "message": message})

    # --- setup -----------------------------------------------------------------------------
    run = Path(config.output) if config.output else _default_output(config)
    # A directory holding only a finished search (`tune`) is this run's own start.
    if not resume and run.exists() and any(p.name != "tune" for p in run.iterdir()):
        raise AfinarError(f"{run}: run directory exists and is not empty",
                          f"resume it with `afinar train --resume {run}`, or pick --output")
    # Absolute paths in the saved config: `--resume` and `afinar chat RUN` work from any folder.
    absolute = {k: str(Path(v).resolve()) for k, v in (("data", config.data),
                ("validation_data", config.validation_data), ("model", config.model),
                ("checks", config.checks))
                if v and Path(v).exists() and not (k == "model" and v in BASE_MODELS)}
    config = config.model_copy(update={"output": str(run), **absolute})
    _check_input_files(config)
    if config.tune and not resume:
        from afinar.train.tune import tune_config

        # Short runs on the training part pick learning rate and epochs; the run below uses
        # the winner, and its saved config says so (numbers, tune: false).
        config, _ = tune_config(config, run, on_event=on_event if _is_main_rank() else None)
    # Everything a user can get wrong (files, settings, data lines, the model's name) is checked
    # before anything heavy is built: the model's weights, the accelerator, a process group.
    device = pick_device(config.device)
    pick_precision(config.precision, device)  # a precision this device lacks fails here
    main = _is_main_rank()
    if not main:  # one voice per run: only rank 0 reports progress
        emit = lambda event: None  # noqa: E731 (say() calls emit, so it goes quiet too)
    resolved = resolve_model(config.model, notify=say)
    tokenizer = load_tokenizer(resolved.tokenizer_source)
    stops = stop_token_ids(tokenizer, generation_config=read_generation_config(resolved.weights))
    encoder = ChatEncoder(tokenizer, stops)
    data: PreparedData = prepare_data(config, encoder)
    epochs = (auto_epochs(len(data.train),
                          sum(len(t.input_ids) for t in as_sequences(data.train)))
              if config.epochs == "auto" else config.epochs)
    model_config = read_model_config(resolved.weights)
    # `auto` on a CPU: the faster of fp32 and bf16 for this model, measured (plan/speed.py).
    choice = choose_precision(config, model_config, device,
                              [len(t.input_ids) for t in as_sequences(data.train)])
    precision = choice.precision
    say(choice.reason)
    replay = None
    if config.preserve_on():
        replay = build_replay(config, resolved, encoder, data.train_examples, data.train,
                              device, notify=say, on_progress=lambda done, total: emit(
                                  {"type": "eval_progress", "task": "preserve: base answers",
                                   "done": done, "total": total}))
        data.report["preserve"] = replay.info
        say(describe_replay(replay.info))
    # The memory plan, from the model's configuration and the data's lengths: a run that
    # cannot fit stops here, before the weights load, with the settings that would fit.
    epoch_items = data.train + ([replay.items[i] for i in replay.for_epoch(0)] if replay else [])
    # What the run will train: max_steps may end it before its epochs do.
    plan_epochs = min(epochs, epochs_for_steps(config, len(epoch_items))) if config.max_steps \
        else epochs
    plan = plan_for_config(config, epoch_items, data.held, plan_epochs, device, precision,
                           model_config=model_config, weights_folder=resolved.weights)
    if not plan.fits:
        raise does_not_fit_error(plan, config)
    checkpointing = plan.chosen.settings.gradient_checkpointing
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    compiled, why = should_compile(config.compile, device=device, world=world_size,
                                   quantization=config.quantization, checkpointing=checkpointing,
                                   planned_train_seconds=plan.time["train_seconds"],
                                   sharded=sharding.sharded_launch())
    if config.compile is not False:
        say(why)
    if compiled:  # compiled layers run at another speed (and keep other activations)
        compiled_plan = plan_for_config(config, epoch_items, data.held, plan_epochs, device,
                                        precision, model_config=model_config,
                                        weights_folder=resolved.weights, compiled=True)
        if compiled_plan.fits:
            plan = compiled_plan
        else:
            compiled = False
            say("compile: off (the compiled layers would not fit the memory budget)")
    say(plan.summary_line())

    accelerator = make_accelerator(device, precision)
    set_seed(config.seed)
    if accelerator.device.type == "cpu" and not compiled:
        # Eager steps allocate every element-wise result apart; compiled layers do not need
        # this (train/compiled.py measures both).
        return_freed_memory()
    model = load_training_model(
        resolved, frozen_linear_dtype(config.method, config.lora.dora, precision),
        config.quantization, COMPUTE_DTYPES.get(precision, torch.float32),
        gradient_checkpointing=checkpointing, device=accelerator.device)
    if checkpointing and config.quantization == "none":
        enable_gradient_checkpointing(model)
    for warning in data.warnings:
        say(warning, "warning")

    if main:
        run.mkdir(parents=True, exist_ok=True)
        started.update(run=run, config=config)
        (run / rundir.CONFIG_FILE).write_text(dump_config(config))
        rundir.write_json_atomic(run / rundir.DATA_REPORT, data.report)
        rundir.write_json_atomic(run / rundir.PLAN_FILE, plan.to_dict())
        tokenizer.save_pretrained(run / rundir.TOKENIZER_DIR)
        data_file = Path(config.data)
        _write_run_info(run, config, "running", base_model_path=resolved.weights,
                        precision=precision, precision_reason=choice.reason,
                        precision_probe_seconds=choice.measured, device=str(accelerator.device),
                        data_sha256=sha256_file(data_file), data_size=data_file.stat().st_size)
        _register(run, emit)

    model = adapters.attach(model, config.method, config.lora)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if compiled:
        compile_layers(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    objective = make_objective(config, model)
    loss_model = objective.module

    world, rank = accelerator.num_processes, accelerator.process_index
    # What one epoch trains on: every task example and this epoch's share of the replay set
    # (a function of the epoch alone, so a resumed run sees the same examples).
    pool = data.train + (replay.items if replay else [])
    n_task = len(data.train)

    def epoch_members(epoch: int) -> list[int]:
        return list(range(n_task)) + ([n_task + i for i in replay.for_epoch(epoch)]
                                      if replay else [])

    n_epoch_items = len(epoch_members(0))
    micro_per_epoch = math.ceil(n_epoch_items / config.batch_size) // world
    if micro_per_epoch == 0:
        raise AfinarError(f"{n_epoch_items} training examples cannot feed {world} processes "
                          f"with batch_size {config.batch_size}", "lower batch_size")
    steps_per_epoch = math.ceil(micro_per_epoch / config.gradient_accumulation_steps)
    total_steps = epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    has_eval = bool(data.held)
    eval_steps = config.eval_steps or max(1, math.ceil(total_steps / 10))
    save_steps = config.save_steps or eval_steps
    lr = config.resolved_learning_rate(plan.model["parameters"])  # the plan counted them

    optimizer = _build_optimizer(model, config, lr)
    scheduler = _build_scheduler(optimizer, config, total_steps)
    # The scheduler is not given to accelerate: it would step it once per process. FSDP2 and
    # DeepSpeed take the optimizer built before wrapping (accelerate remaps its parameters).
    loss_model, optimizer = sharding.prepare(accelerator, loss_model, optimizer, config, say)
    trainable = [p for p in loss_model.parameters() if p.requires_grad]
    if getattr(objective, "needs_reference", False):
        # Before any checkpoint is restored: the model is still the starting model here.
        attach_reference(run, data, accelerator, loss_model, model, config, tokenizer.pad_token_id,
                         say, emit)

    state = ckpt.TrainState()
    resumed_from = ckpt.latest_checkpoint(run) if resume else None
    if resumed_from:
        payload = ckpt.load_checkpoint(resumed_from)
        state = sharding.restore(accelerator, loss_model, model, optimizer, scheduler, payload, run)
        say(f"resumed from {resumed_from} (step {state.global_step}, epoch {state.epoch + 1})")
    elif resume:
        say(f"{run}: no checkpoint found; starting from the beginning", "warning")
    trackers.start(run, config.model_dump(mode="json"), say, first_step=state.global_step)
    metrics = _Metrics(run / rundir.METRICS_FILE, main, state.global_step if resume else None,
                       trackers)
    if main and not resume:
        (run / rundir.METRICS_FILE).write_text("")

    pad_id = tokenizer.pad_token_id
    emit({"type": "start", "run_dir": str(run), "total_steps": total_steps, "epochs": epochs,
          "steps_per_epoch": steps_per_epoch, "train_examples": len(data.train),
          "held_out_examples": len(data.held), "trainable_params": n_trainable,
          "total_params": n_total, "learning_rate": lr, "precision": precision,
          "device": str(accelerator.device), "processes": world, "start_step": state.global_step,
          "data_report": data.report})

    def run_eval() -> dict | None:
        if not has_eval:
            return None
        result = objective.evaluate(loss_model, data.held, config.batch_size, pad_id, accelerator)
        result["step"] = state.global_step
        metrics.write({"type": "eval", **result})
        improved = state.best_eval_loss is None or result["eval_loss"] < state.best_eval_loss - 1e-4
        if improved:
            state.best_eval_loss, state.best_step = result["eval_loss"], state.global_step
            state.evals_without_improvement = 0
            weights = sharding.full_weights(accelerator, loss_model, model)  # all ranks
            if main:
                _save_folder_atomic(accelerator.unwrap_model(loss_model).model,
                                    ckpt.checkpoints_dir(run) / "best", weights)
        else:
            state.evals_without_improvement += 1
        state.history.append((state.global_step, last_train_loss, result["eval_loss"]))
        _warn_overfitting(state.history, say)
        emit({"type": "eval", **result, "best_eval_loss": state.best_eval_loss,
              "best_step": state.best_step})
        return result

    # --- steps -----------------------------------------------------------------------------
    last_train_loss = None
    if state.global_step == 0 and has_eval:
        run_eval()  # the base model's held-out loss: the number training must beat
    run_start = time.perf_counter()
    step_tokens = 0
    start_step = state.global_step
    done = state.global_step >= total_steps
    while not done and state.epoch < epochs:
        members = epoch_members(state.epoch)
        batches = plan_batches([objective.length(pool[i]) for i in members], config.batch_size,
                               config.seed, state.epoch)
        batches = [[members[i] for i in b] for b in batches[: micro_per_epoch * world][rank::world]]
        for step_idx in range(state.step_in_epoch, steps_per_epoch):
            ga = config.gradient_accumulation_steps
            group = [objective.collate([pool[i] for i in b], pad_id)
                     for b in batches[step_idx * ga:(step_idx + 1) * ga]]
            # The loss's denominators over the whole accumulated batch on all processes (SFT:
            # weighted target tokens, and plain ones for accuracy; DPO: pairs).
            local = torch.tensor([objective.denominators(g) for g in group],
                                 dtype=torch.float64, device=accelerator.device).sum(0)
            local = accelerator.reduce(local, "sum") if world > 1 else local
            n_target, n_plain = local[0].item(), local[1].item()
            step_started = time.perf_counter()
            sums = None
            for k, batch in enumerate(group):
                batch = {key: v.to(accelerator.device) for key, v in batch.items()}
                sync = sharding.accumulating(accelerator, loss_model, last=k == len(group) - 1)
                with sync, accelerator.autocast():
                    loss, stats = objective.loss(loss_model, batch, n_target, n_plain)
                    # DDP averages gradients over processes, hence the * world.
                    accelerator.backward(loss * world)
                sums = stats if sums is None else sums + stats
                step_tokens += int(batch["attention_mask"].sum())
            grad_norm = None
            if config.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(trainable, config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
            state.step_seconds += time.perf_counter() - step_started
            state.global_step += 1
            state.step_in_epoch = step_idx + 1
            step_metrics = objective.record(sums, n_target, n_plain)
            last_train_loss = step_metrics["train_loss"]
            elapsed = time.perf_counter() - run_start
            state.tokens_seen += step_tokens * world
            done_steps = state.global_step - start_step
            record = {"type": "train", "step": state.global_step,
                      "epoch": round(state.epoch + state.step_in_epoch / steps_per_epoch, 4),
                      **step_metrics,
                      "learning_rate": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "tokens_per_s": state.tokens_seen / max(1e-9, state.step_seconds),
                      "tokens_seen": state.tokens_seen,
                      "elapsed_s": round(state.elapsed_s + elapsed, 3)}
            metrics.write(record)
            pausing = None
            try:
                emit({**record, "type": "step", "total_steps": total_steps,
                      "eta_s": elapsed / done_steps * (total_steps - state.global_step)})
            except ckpt.SaveThenStop as exc:
                if world > 1:  # only rank 0 heard it; the checkpoint is a collective
                    raise
                pausing = exc
            step_tokens = 0

            stop = state.global_step >= total_steps
            if has_eval and (state.global_step % eval_steps == 0 or stop):
                run_eval()
                if (config.early_stopping_patience
                        and state.evals_without_improvement >= config.early_stopping_patience):
                    state.stopped_early = stop = True
                    say(f"early stopping at step {state.global_step}: held-out loss has not "
                        f"improved for {state.evals_without_improvement} evaluations (best "
                        f"{state.best_eval_loss:.4f} at step {state.best_step})")
            save = state.global_step % save_steps == 0 or stop or pausing is not None
            if save:  # every rank: shards, RNG states
                saved_weights, saved_optimizer, saved_rng = sharding.gather_checkpoint(
                    accelerator, loss_model, model, optimizer, run, state.global_step)
            if main and save:
                state_elapsed = state.elapsed_s
                state.elapsed_s += time.perf_counter() - run_start
                saved = ckpt.save_checkpoint(run, state, saved_weights, saved_optimizer,
                                             scheduler, keep=config.keep_checkpoints,
                                             rng_ranks=saved_rng)
                emit({"type": "checkpoint", "step": state.global_step, "path": str(saved),
                      "train_loss": last_train_loss})
                state.elapsed_s = state_elapsed
            if pausing is not None:
                raise pausing
            if stop:
                done = True
                break
        else:
            state.epoch += 1
            state.step_in_epoch = 0
    accelerator.wait_for_everyone()
    state.elapsed_s += time.perf_counter() - run_start

    # --- final weights: the best held-out checkpoint, else the last step --------------------
    summary = {"steps": state.global_step, "epochs": epochs, "total_steps": total_steps,
               "objective": config.objective,
               "learning_rate": lr, "preserve": replay.info["per_epoch"] if replay else 0,
               "final_train_loss": last_train_loss, "best_eval_loss": state.best_eval_loss,
               "best_step": state.best_step, "stopped_early": state.stopped_early,
               "tokens_seen": state.tokens_seen,
               # tokens/s counts forward+backward+optimizer time only (not evaluation or
               # checkpoint writing); train_seconds is the wall time of the whole loop.
               "tokens_per_s": state.tokens_seen / max(1e-9, state.step_seconds),
               "train_seconds": round(state.elapsed_s, 2),
               "peak_memory_mb": round(_peak_memory_mb(accelerator.device), 1),
               "trainable_params": n_trainable, "precision": precision, "processes": world,
               "gradient_checkpointing": checkpointing, "quantization": config.quantization,
               "compiled": compiled,
               "planned_peak_memory_mb": round(plan.peak_bytes / 2**20, 1),
               "held_out_examples": len(data.held)}
    weights = sharding.full_weights(accelerator, loss_model, model)  # all ranks; None unsharded
    if main:
        dest = run / (rundir.ADAPTER_DIR if config.method == "lora" else rundir.FULL_MODEL_DIR)
        best = ckpt.checkpoints_dir(run) / "best"
        if best.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=run))
            shutil.copytree(best, tmp, dirs_exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        else:
            _save_folder_atomic(accelerator.unwrap_model(loss_model).model, dest, weights)
        _write_run_info(run, config, "succeeded", summary=summary,
                        weights=dest.name, finished_at=datetime.now(timezone.utc).isoformat(
                            timespec="seconds"))
        from afinar.model_card import try_write_card  # RUN/README.md; eval refreshes it

        try_write_card(run, run, warn=lambda message: say(message, "warning"))
    emit({"type": "end", "run_dir": str(run), **summary})
    return TrainResult(run, summary, main)


def _warn_overfitting(history: list, say) -> None:
    """Held-out loss rising for two evaluations in a row while training loss falls."""
    if len(history) < 3:
        return
    (_, t0, e0), (_, t1, e1), (step, t2, e2) = history[-3:]
    if None in (t0, t1, t2):
        return
    if e2 > e1 > e0 and t2 < t1 < t0:
        say(f"possible overfitting at step {step}: held-out loss rose ({e0:.3f} → {e2:.3f}) while "
            f"training loss fell ({t0:.3f} → {t2:.3f}); the best checkpoint is kept", "warning")
