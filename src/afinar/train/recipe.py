"""The training recipe: one run of the model on the data, in five stages that share a Session.

    from afinar.train.recipe import train
    result = train(TrainConfig(data="examples/soporte-triaje/data.jsonl"))   # run dir, summary

    prepare  the run directory, the model's tokenizer, the data, the precision (measured)
    plan     the memory and time plan; a run that cannot fit stops here, before any weights load
    build    the model (adapters, compiled layers), the objective, optimizer, schedule, resume
    run      the steps, held-out evaluations and checkpoints (train/loop.py)
    finish   the final weights (the best held-out checkpoint, else the last step), run.json

That is all `train` does: it neither searches hyperparameters, nor records a version, nor
evaluates base against tuned, nor writes the model card. Those are the product around a run,
`afinar.pipeline.fine_tune`, which the CLI, the server's worker, the demo and `afinar.train`
call; a hyperparameter search (afinar/tune.py) calls this recipe for its trials.

What a step optimises (SFT, DPO, ORPO) is the small objective in train/objectives.py. Runs
single-process on CPU or GPU, and multi-process under `torchrun`/`accelerate launch` (accelerate
provides device placement, autocast and DDP; FSDP2 and DeepSpeed ZeRO with what differs for a
sharded model in train/sharding.py). Progress goes to `on_event` as events, so the CLI, the
server and tests observe the same run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from afinar import rundir
from afinar.config import TrainConfig, auto_epochs, dump_config
from afinar.data.prepare import prepare_data
from afinar.data.tokenize import ChatEncoder
from afinar.errors import AfinarError
from afinar.events import End, EvalProgress, Listener, RunDir
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
from afinar.train.control import Control
from afinar.train.host_memory import return_freed_memory
from afinar.train.loop import peak_memory_mb, run_steps, save_folder_atomic
from afinar.train.metrics import Metrics
from afinar.train.objectives import make_objective
from afinar.train.reference import attach_reference
from afinar.train.replay import build_replay
from afinar.train.replay import describe as describe_replay
from afinar.train.session import Schedule, Session
from afinar.train.tracking import Trackers



@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    is_main_process: bool = True  # False on the other ranks of a multi-process run
    report: object | None = None  # the end-of-run EvalReport (afinar.evaluation), when it ran


def train(config: TrainConfig, on_event: Listener | None = None, resume: bool = False,
          trackers: Trackers | None = None, control: Control | None = None,
          base_answerer=None) -> TrainResult:
    """Fine-tunes `config.model` on `config.data`; returns the run directory and a summary.

    A run that fails or is interrupted records that in run.json (status failed/interrupted), so
    nothing half-trained looks finished; `resume=True` continues from its last checkpoint.
    `trackers`: the tracking tools the run reports to (the pipeline's; none by default).
    `control`: asked after every step whether to pause or cancel (train/control.py).
    `base_answerer`: the engine that answers the preserve replay set (the pipeline passes
    afinar.engines.base_answerer's); None: transformers.
    """
    s = Session(settle_config(config, resume), resume, on_event or (lambda event: None),
                trackers or Trackers(), control or Control(), base_answerer=base_answerer)
    try:
        prepare(s)
        plan(s)
        build(s)
        run_steps(s)
        result = finish(s)
        _release(s)
        return result
    except BaseException as exc:
        if s.started:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            write_run_info(s.run, s.config, status,
                           error=f"{exc.__class__.__name__}: {exc}"[:2000])
            if (s.run / rundir.CHECKPOINTS_DIR).is_dir():
                s.say(f"run {status}; continue it with: afinar train --resume {s.run}",
                      "warning")
        raise


# --- stages ------------------------------------------------------------------------------------

def settle_config(config: TrainConfig, resume: bool) -> TrainConfig:
    """The run directory (default runs/DATA-STAMP) and absolute input paths, so `--resume` and
    `afinar chat RUN` work from any folder; checks the inputs exist and the directory is free.
    Safe to repeat (the pipeline settles before a search, the recipe again)."""
    run = Path(config.output) if config.output else _default_output(config)
    # A directory holding only a finished search (`tune`) is this run's own start.
    if not resume and run.exists() and any(p.name != "tune" for p in run.iterdir()):
        raise AfinarError(f"{run}: run directory exists and is not empty",
                          f"resume it with `afinar train --resume {run}`, or pick --output")
    absolute = {k: str(Path(v).resolve()) for k, v in (("data", config.data),
                ("validation_data", config.validation_data), ("model", config.model),
                ("checks", config.checks))
                if v and Path(v).exists() and not (k == "model" and v in BASE_MODELS)}
    config = config.model_copy(update={"output": str(run), **absolute})
    _check_input_files(config)
    return config


def prepare(s: Session) -> None:
    """Everything a user can get wrong (settings, data lines, the model's name) is checked
    before anything heavy is built: the model's weights, the accelerator, a process group."""
    config = s.config
    s.run = Path(config.output)
    s.device = pick_device(config.device)
    pick_precision(config.precision, s.device)  # a precision this device lacks fails here
    s.main = is_main_rank()
    if not s.main:  # one voice per run: only rank 0 reports progress and hears its control
        s.emit, s.control = (lambda event: None), Control()
    s.resolved = resolve_model(config.model, notify=s.say)
    s.tokenizer = load_tokenizer(s.resolved.tokenizer_source)
    stops = stop_token_ids(s.tokenizer,
                           generation_config=read_generation_config(s.resolved.weights))
    encoder = ChatEncoder(s.tokenizer, stops)
    s.data = prepare_data(config, encoder)
    lengths = [len(t.input_ids) for t in as_sequences(s.data.train)]
    s.epochs = auto_epochs(len(s.data.train), sum(lengths)) if config.epochs == "auto" \
        else config.epochs
    s.model_config = read_model_config(s.resolved.weights)
    # `auto` on a CPU: the faster of fp32 and bf16 for this model, measured (plan/speed.py).
    s.precision_choice = choose_precision(config, s.model_config, s.device, lengths)
    s.precision = s.precision_choice.precision
    s.say(s.precision_choice.reason)
    if config.preserve_on():
        s.replay = build_replay(config, s.resolved, encoder, s.data.train_examples, s.data.train,
                                s.device, notify=s.say, on_progress=lambda done, total: s.emit(
                                    EvalProgress("preserve: base answers", done, total)),
                                answerer=s.base_answerer)
        s.data.report["preserve"] = s.replay.info
        s.say(describe_replay(s.replay.info))


def plan(s: Session) -> None:
    """The memory plan, from the model's configuration and the data's lengths: a run that
    cannot fit stops here, before the weights load, with the settings that would fit."""
    config, data, replay = s.config, s.data, s.replay
    epoch_items = data.train + ([replay.items[i] for i in replay.for_epoch(0)] if replay else [])
    # What the run will train: max_steps may end it before its epochs do.
    plan_epochs = min(s.epochs, epochs_for_steps(config, len(epoch_items))) \
        if config.max_steps else s.epochs

    def plan_with(compiled: bool):
        return plan_for_config(config, epoch_items, data.held, plan_epochs, s.device,
                               s.precision, model_config=s.model_config,
                               weights_folder=s.resolved.weights, compiled=compiled)
    s.plan = plan_with(False)
    if not s.plan.fits:
        raise does_not_fit_error(s.plan, config)
    s.checkpointing = s.plan.chosen.settings.gradient_checkpointing
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    s.compiled, why = should_compile(config.compile, device=s.device, world=world_size,
                                     quantization=config.quantization,
                                     checkpointing=s.checkpointing,
                                     planned_train_seconds=s.plan.time["train_seconds"],
                                     sharded=sharding.sharded_launch())
    if config.compile is not False:
        s.say(why)
    if s.compiled:  # compiled layers run at another speed (and keep other activations)
        compiled_plan = plan_with(True)
        if compiled_plan.fits:
            s.plan = compiled_plan
        else:
            s.compiled = False
            s.say("compile: off (the compiled layers would not fit the memory budget)")
    s.say(s.plan.summary_line())


def build(s: Session) -> None:
    """The model, then what trains it. The run directory is written once the model loaded."""
    from accelerate.utils import set_seed

    config = s.config
    s.accelerator = make_accelerator(s.device, s.precision)
    set_seed(config.seed)
    if s.accelerator.device.type == "cpu" and not s.compiled:
        # Eager steps allocate every element-wise result apart; compiled layers do not need
        # this (train/compiled.py measures both).
        return_freed_memory()
    model = load_training_model(
        s.resolved, frozen_linear_dtype(config.method, config.lora.dora, s.precision),
        config.quantization, COMPUTE_DTYPES.get(s.precision, torch.float32),
        gradient_checkpointing=s.checkpointing, device=s.accelerator.device)
    if s.checkpointing and config.quantization == "none":
        enable_gradient_checkpointing(model)
    for warning in s.data.warnings:
        s.say(warning, "warning")
    if s.main:
        _write_run_dir(s)
    model = adapters.attach(model, config.method, config.lora)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    if s.compiled:
        compile_layers(model)
    s.model = model
    s.counts = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                sum(p.numel() for p in model.parameters()))
    s.objective = make_objective(config, model)
    s.schedule = Schedule.for_run(config, s.data, s.replay, s.epochs,
                                  s.accelerator.num_processes)
    _build_optimisation(s)


def _build_optimisation(s: Session) -> None:
    """Optimizer and schedule, the engine's wrapping, the reference model, a resumed state."""
    config, run = s.config, s.run
    s.lr = config.resolved_learning_rate(s.plan.model["parameters"])  # the plan counted them
    optimizer = _build_optimizer(s.model, config, s.lr)
    s.scheduler = _build_scheduler(optimizer, config, s.schedule.total_steps)
    # The scheduler is not given to accelerate: it would step it once per process. FSDP2 and
    # DeepSpeed take the optimizer built before wrapping (accelerate remaps its parameters).
    s.loss_model, s.optimizer = sharding.prepare(s.accelerator, s.objective.module, optimizer,
                                                 config, s.say)
    s.trainable = [p for p in s.loss_model.parameters() if p.requires_grad]
    if getattr(s.objective, "needs_reference", False):
        # Before any checkpoint is restored: the model is still the starting model here.
        attach_reference(run, s.data, s.accelerator, s.loss_model, s.model, config,
                         s.tokenizer.pad_token_id, s.say, s.emit)
    resumed_from = ckpt.intact_checkpoint(run, s.say) if s.resume else None
    if resumed_from:
        payload = ckpt.load_checkpoint(resumed_from)
        s.state = sharding.restore(s.accelerator, s.loss_model, s.model, s.optimizer,
                                   s.scheduler, payload, run)
        s.say(f"resumed from {resumed_from} (step {s.state.global_step}, epoch "
              f"{s.state.epoch + 1})")
    elif s.resume:
        s.say(f"{run}: no checkpoint found; starting from the beginning", "warning")
    s.trackers.start(run, config.model_dump(mode="json"), s.say, first_step=s.state.global_step)
    s.metrics = Metrics(run / rundir.METRICS_FILE, s.main,
                        s.state.global_step if s.resume else None, s.trackers)
    if s.main and not s.resume:
        (run / rundir.METRICS_FILE).write_text("")


def finish(s: Session) -> TrainResult:
    """The final weights: the best held-out checkpoint, else the last step; run.json says
    succeeded with the summary."""
    config, state, run = s.config, s.state, s.run
    summary = {"steps": state.global_step, "epochs": s.epochs,
               "total_steps": s.schedule.total_steps, "objective": config.objective,
               "learning_rate": s.lr, "preserve": s.replay.info["per_epoch"] if s.replay else 0,
               "final_train_loss": s.last_train_loss, "best_eval_loss": state.best_eval_loss,
               "best_step": state.best_step, "stopped_early": state.stopped_early,
               "tokens_seen": state.tokens_seen,
               # tokens/s counts forward+backward+optimizer time only (not evaluation or
               # checkpoint writing); train_seconds is the wall time of the whole loop.
               "tokens_per_s": state.tokens_seen / max(1e-9, state.step_seconds),
               "train_seconds": round(state.elapsed_s, 2),
               "peak_memory_mb": round(peak_memory_mb(s.accelerator.device), 1),
               "trainable_params": s.counts[0], "precision": s.precision,
               "processes": s.accelerator.num_processes,
               "gradient_checkpointing": s.checkpointing, "quantization": config.quantization,
               "compiled": s.compiled,
               "planned_peak_memory_mb": round(s.plan.peak_bytes / 2**20, 1),
               "held_out_examples": len(s.data.held)}
    weights = sharding.full_weights(s.accelerator, s.loss_model, s.model)  # all ranks
    if s.main:
        dest = run / (rundir.ADAPTER_DIR if config.method == "lora" else rundir.FULL_MODEL_DIR)
        best = ckpt.checkpoints_dir(run) / "best"
        if best.is_dir():
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=run))
            shutil.copytree(best, tmp, dirs_exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
        else:
            save_folder_atomic(s.accelerator.unwrap_model(s.loss_model).model, dest, weights)
        write_run_info(run, config, "succeeded", summary=summary, weights=dest.name,
                       finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    s.emit(End(str(run), summary))
    return TrainResult(run, summary, s.main)


# --- the pieces the stages use -------------------------------------------------------------------

def is_main_rank() -> bool:
    """Rank 0 (or a single process), known before accelerate sets up the process group:
    torchrun and `accelerate launch` both set RANK."""
    return os.environ.get("RANK", "0") == "0"


def write_run_info(run: Path, config: TrainConfig, status: str, **extra) -> None:
    info = rundir.read_run_info(run)
    # "lora", "full", or with a preference objective "lora dpo", "full orpo"...
    method = config.method if config.objective == "sft" else f"{config.method} {config.objective}"
    info.update({"status": status, "base_model": config.model, "method": method,
                 "data": config.data, **extra})
    info.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    info["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rundir.write_json_atomic(run / rundir.RUN_FILE, info)


def _write_run_dir(s: Session) -> None:
    """config.yaml, the data report, the plan, the tokenizer and run.json (status running)."""
    run, config = s.run, s.config
    run.mkdir(parents=True, exist_ok=True)
    (run / rundir.CONFIG_FILE).write_text(dump_config(config))
    rundir.write_json_atomic(run / rundir.DATA_REPORT, s.data.report)
    rundir.write_json_atomic(run / rundir.PLAN_FILE, s.plan.to_dict())
    s.tokenizer.save_pretrained(run / rundir.TOKENIZER_DIR)
    data_file = Path(config.data)
    write_run_info(run, config, "running", base_model_path=s.resolved.weights,
                   precision=s.precision, precision_reason=s.precision_choice.reason,
                   precision_probe_seconds=s.precision_choice.measured,
                   device=str(s.accelerator.device), data_sha256=sha256_file(data_file),
                   data_size=data_file.stat().st_size)
    s.started = True
    s.emit(RunDir(str(run)))


def _release(s: Session) -> None:
    """Frees the model, its engine wrapping and the optimizer now, as a function's locals are
    freed when it returns: the session may stay referenced (a progress callback's closure) until
    the interpreter exits, and FSDP's modules freed then, after the process group's threads,
    aborted a rank ("terminate called without an active exception", SIGABRT: 2 of about 10
    test_fsdp.py runs in long pytest sessions). Then every rank leaves the process group; what
    may follow on rank 0 (the evaluation) is single-process."""
    import gc

    import torch.distributed as dist

    accelerator = s.accelerator
    s.model = s.loss_model = s.objective = s.optimizer = s.scheduler = s.accelerator = None
    s.trainable = []
    accelerator.free_memory()  # accelerate's own references to what it prepared; collects
    gc.collect()
    if accelerator.num_processes > 1 and dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()


def _default_output(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{Path(config.data).stem}-{stamp}"


def _check_input_files(config: TrainConfig) -> None:
    for key in ("data", "validation_data", "checks"):
        value = getattr(config, key)
        if value and not Path(value).is_file():
            what = "is a folder, not a file" if Path(value).is_dir() else "no such file"
            raise AfinarError(f"{value}: {what} ({key})",
                              "check the path; data files are JSONL, one example per line"
                              if key != "checks" else "check the path of the checks YAML file")


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
