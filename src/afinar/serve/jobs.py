"""Fine-tuning jobs: creation, file validation, cancel/pause/resume, and the job → TrainConfig
mapping the worker trains with. The web process and the worker call these; no HTTP here.

Statuses: validating_files → queued → running → succeeded | failed | cancelled, and
running → paused → queued (resume continues from the last checkpoint).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from afinar import rundir
from afinar.config import TrainConfig
from afinar.data.validate import load_examples
from afinar.serve.errors import ApiError, not_found
from afinar.serve.ids import new_id, now
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store

FINAL = ("succeeded", "failed", "cancelled")
_SUFFIX = re.compile(r"[A-Za-z0-9_.-]*")


def model_name(job: dict, organization: str) -> str:
    """ft:BASE:ORG:SUFFIX:ID, as OpenAI names fine-tuned models (an empty suffix stays empty)."""
    return f"ft:{job['model']}:{organization}:{job['suffix'] or ''}:{job['id'].split('-', 1)[1]}"


def effective_hyperparameters(job: dict) -> dict:
    """The newer `method.supervised.hyperparameters` wins over the legacy `hyperparameters`."""
    method = job.get("method") or {}
    from_method = ((method.get("supervised") or {}).get("hyperparameters")) or {}
    legacy = job.get("hyperparameters") or {}
    merged = {k: v for k, v in legacy.items() if v is not None}
    merged.update({k: v for k, v in from_method.items() if v is not None})
    return merged


def create_job(store: Store, settings: ServeSettings, request) -> dict:
    bases = settings.base_models()
    if request.model not in bases:
        raise ApiError(404, f"The model '{request.model}' does not exist or cannot be "
                       f"fine-tuned here. Available: {', '.join(sorted(bases))}.", param="model",
                       code="model_not_found")
    for param in ("training_file", "validation_file"):
        file_id = getattr(request, param)
        if file_id is None:
            continue
        row = store.file(file_id)
        if row is None:
            raise ApiError(400, f"invalid {param}: no file with id '{file_id}'.", param=param,
                           code="invalid_file")
        if row["purpose"] != "fine-tune":
            raise ApiError(400, f"{param} '{file_id}' has purpose '{row['purpose']}'; upload it "
                           "with purpose='fine-tune'.", param=param, code="invalid_file_purpose")
    if request.method is not None and request.method.type != "supervised":
        raise ApiError(400, f"method.type '{request.method.type}' is not supported yet; use "
                       "'supervised'.", param="method.type", code="unsupported_method")
    if request.suffix and not _SUFFIX.fullmatch(request.suffix):
        raise ApiError(400, "suffix may only contain letters, digits, '_', '.' and '-'.",
                       param="suffix")
    hp = request.hyperparameters.model_dump(exclude_none=True) if request.hyperparameters else {}
    job_id = new_id("ftjob-")
    row = store.add_job({
        "id": job_id, "model": request.model, "base_spec": bases[request.model],
        "training_file": request.training_file, "validation_file": request.validation_file,
        "hyperparameters": hp, "method": request.method.model_dump(exclude_none=True)
        if request.method else None, "suffix": request.suffix,
        "seed": request.seed if request.seed is not None else 42, "metadata": request.metadata,
        "status": "validating_files", "result_files": [],
        "run_dir": str(settings.state_dir() / "runs" / job_id)})
    store.update_job(job_id, model_name=model_name(row, settings.organization))
    store.add_event(job_id, f"Created fine-tuning job: {job_id}")
    return store.job(job_id)


def validate_files(store: Store, job_id: str) -> None:
    """validating_files → queued, or failed with the first problems named by line."""
    job = store.job(job_id)
    if job is None or job["status"] != "validating_files":
        return
    store.add_event(job_id, "Validating training file: " + job["training_file"])
    for param in ("training_file", "validation_file"):
        file_id = job[param]
        if file_id is None:
            continue
        row = store.file(file_id)
        if row is None:
            return fail_job(store, job_id, "invalid_file",
                            f"The {param} '{file_id}' was deleted.", param)
        report = load_examples(store.file_path(file_id), for_training=param == "training_file")
        if report.errors:
            shown = "; ".join(
                f"line {i.line}: {i.field + ': ' if i.field else ''}{i.message}"
                for i in report.errors[:5])
            more = f" (and {len(report.errors) - 5} more)" if len(report.errors) > 5 else ""
            return fail_job(store, job_id, f"invalid_{param}",
                            f"The job failed due to an invalid {param.replace('_', ' ')} "
                            f"'{file_id}' ({row['filename']}): {shown}{more}.", param)
    if store.update_job(job_id, when_status=("validating_files",), status="queued"):
        store.add_event(job_id, "Files validated, moving job to queued state")


def fail_job(store: Store, job_id: str, code: str, message: str,
             param: str | None = None) -> None:
    store.update_job(job_id, status="failed", finished_at=now(),
                     error={"code": code, "message": message, "param": param})
    store.add_event(job_id, message, level="error")


def get_job(store: Store, job_id: str) -> dict:
    job = store.job(job_id)
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def cancel_job(store: Store, job_id: str) -> dict:
    job = get_job(store, job_id)
    if job["status"] in FINAL:
        raise ApiError(400, f"Job {job_id} has already {job['status']} and cannot be "
                       "cancelled.", code="job_already_finished")
    # Not yet running: cancelled at once. Running: the worker stops at its next step.
    if not store.update_job(job_id, when_status=("validating_files", "queued", "paused"),
                            status="cancelled", finished_at=now()):
        store.update_job(job_id, when_status=("running",), requested="cancel")
    else:
        store.add_event(job_id, "Fine-tuning job cancelled")
    return store.job(job_id)


def _job_in(store: Store, job_id: str, status: str, action: str) -> dict:
    job = get_job(store, job_id)
    if job["status"] != status:
        raise ApiError(400, f"Job {job_id} is {job['status']}; only a {status} job can be "
                       f"{action}.", code="invalid_job_state")
    return job


def pause_job(store: Store, job_id: str) -> dict:
    _job_in(store, job_id, "running", "paused")
    store.update_job(job_id, when_status=("running",), requested="pause")
    return store.job(job_id)


def resume_job(store: Store, job_id: str) -> dict:
    _job_in(store, job_id, "paused", "resumed")
    store.update_job(job_id, when_status=("paused",), status="queued", resume=1, requested=None)
    store.add_event(job_id, "Fine-tuning job resumed; queued")
    return store.job(job_id)


def train_config(store: Store, settings: ServeSettings, job: dict) -> TrainConfig:
    """What `afinar train` would be given for this job. OpenAI's learning_rate_multiplier
    scales afinar's auto learning rate (which depends on the model's size)."""
    hp = effective_hyperparameters(job)
    values = {
        "data": str(store.file_path(job["training_file"])), "model": job["base_spec"],
        "output": job["run_dir"], "seed": job["seed"], "keep_checkpoints": 3,
        "evaluate": settings.evaluate_jobs,
    }
    if job["validation_file"]:
        values["validation_data"] = str(store.file_path(job["validation_file"]))
    else:
        values["held_out_fraction"] = settings.held_out_fraction
    if hp.get("n_epochs") not in (None, "auto"):
        values["epochs"] = int(hp["n_epochs"])
    if hp.get("batch_size") not in (None, "auto"):
        values["batch_size"] = int(hp["batch_size"])
    multiplier = hp.get("learning_rate_multiplier")
    if multiplier not in (None, "auto"):
        values["learning_rate_multiplier"] = float(multiplier)
    return TrainConfig(**values)


def results_csv(run_dir: Path) -> str:
    """OpenAI's results file: one row per step with training and validation metrics."""
    from afinar.evaluation.diagnosis import read_metrics

    rows: dict[int, dict] = {}
    for record in read_metrics(Path(run_dir) / rundir.METRICS_FILE):
        row = rows.setdefault(record["step"], {"step": record["step"]})
        if record.get("type") == "train":
            row.update(train_loss=record.get("train_loss"),
                       train_accuracy=record.get("train_token_accuracy"))
        elif record.get("type") == "eval":
            row.update(valid_loss=record.get("eval_loss"),
                       valid_mean_token_accuracy=record.get("eval_token_accuracy"))
    out = io.StringIO()
    fields = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: rows[step].get(k, "") for k in fields})
    return out.getvalue()


def resolved_hyperparameters(start_event: dict, config: TrainConfig) -> dict:
    return {"n_epochs": start_event["epochs"], "batch_size": config.batch_size,
            "learning_rate_multiplier": config.learning_rate_multiplier}

