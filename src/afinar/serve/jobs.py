"""Fine-tuning jobs: creation, file validation, cancel/pause/resume, and the job → TrainConfig
mapping the worker trains with. The web process and the worker call these; no HTTP here.

Statuses: validating_files → queued → running → succeeded | failed | cancelled, and
running → paused (after checkpointing the step it was at) → queued (resume continues from
there).
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from afinar import rundir
from afinar.config import TrainConfig, build_config, merge_dicts
from afinar.errors import AfinarError
from afinar.data.formats import format_family
from afinar.data.validate import load_examples
from afinar.serve.errors import ApiError, not_found
from afinar.serve.ids import new_id, now
from afinar.serve.job_settings import advanced_help, nested_settings
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store

FINAL = ("succeeded", "failed", "cancelled")
_SUFFIX = re.compile(r"[A-Za-z0-9_.-]*")


# method.type -> the training objective; "orpo" is afinar's extension of OpenAI's types.
OBJECTIVES = {"supervised": "sft", "dpo": "dpo", "orpo": "orpo"}
# Each hyperparameter: (kind, low, high), "auto" always accepted. n_epochs and batch_size as
# OpenAI documents them; the others as afinar's config allows.
_RANGES = {"n_epochs": (int, 1, 50), "batch_size": (int, 1, 256),
           "learning_rate_multiplier": (float, 1e-3, 100.0), "beta": (float, 1e-4, 2.0),
           "lambda": (float, 1e-4, 10.0)}


def model_name(job: dict, organization: str) -> str:
    """ft:BASE:ORG:SUFFIX:ID, as OpenAI names fine-tuned models (an empty suffix stays empty);
    a job that starts from a fine-tuned model keeps that model's BASE."""
    base = job["model"].split(":")[1] if job["model"].startswith("ft:") else job["model"]
    return f"ft:{base}:{organization}:{job['suffix'] or ''}:{job['id'].split('-', 1)[1]}"


def effective_hyperparameters(job: dict) -> dict:
    """The newer `method.<type>.hyperparameters` wins over the legacy `hyperparameters`."""
    method = job.get("method") or {}
    kind = method.get("type", "supervised")
    from_method = ((method.get(kind) or {}).get("hyperparameters")) or {}
    legacy = job.get("hyperparameters") or {}
    merged = {k: v for k, v in legacy.items() if v is not None}
    merged.update({k: v for k, v in from_method.items() if v is not None})
    return merged


def settings_help() -> dict:
    """Each job hyperparameter with the description of the training setting it sets (the typed
    config's own text), and its accepted range: the dashboard's help for a new job."""
    from afinar.config import DpoSettings, OrpoSettings

    fields = TrainConfig.model_fields
    text = {"n_epochs": fields["epochs"].description,
            "batch_size": fields["batch_size"].description,
            "learning_rate_multiplier": fields["learning_rate_multiplier"].description,
            "beta": DpoSettings.model_fields["beta"].description,
            "lambda": OrpoSettings.model_fields["lambda_"].description}
    return {"method": fields["objective"].description, "settings": advanced_help(),
            "hyperparameters": {name: {"description": text[name], "low": low, "high": high,
                                       "integer": kind is int}
                                for name, (kind, low, high) in _RANGES.items()}}


def _check_method(method) -> None:
    """400s for what cannot be trained: an unsupported type, settings under another type."""
    if method is None:
        return
    if method.type not in OBJECTIVES:
        raise ApiError(400, f"method.type '{method.type}' is not supported; use 'supervised', "
                       "'dpo' or 'orpo' (an afinar extension).", param="method.type",
                       code="unsupported_method")
    for other in ("supervised", "dpo", "orpo", "reinforcement"):
        if other != method.type and getattr(method, other) is not None:
            raise ApiError(400, f"method.{other} was given but method.type is "
                           f"'{method.type}'; put the settings under method.{method.type}.",
                           param=f"method.{other}")


def _check_ranges(values: dict, where: str) -> None:
    for name, value in values.items():
        if value is None or value == "auto":
            continue
        kind, low, high = _RANGES[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (not number or (kind is int and value != int(value))
                or not low <= value <= high):
            what = "an integer" if kind is int else "a number"
            raise ApiError(400, f"{where}.{name} must be {what} between {low:g} and {high:g}, "
                           f"or 'auto'; got {value!r}.", param=f"{where}.{name}",
                           code="invalid_hyperparameter")


def _starting_model(store: Store, settings: ServeSettings, name: str,
                    project: str | None) -> str:
    """What a job trains from: a base model's spec, or a succeeded job's run directory (SFT,
    then DPO: the new adapter trains on that model's merged weights)."""
    bases = settings.base_models()
    if name in bases:
        return bases[name]
    parent = store.job_by_model(name, project)
    if parent is not None and parent["status"] == "succeeded":
        return parent["run_dir"]
    raise ApiError(404, f"The model '{name}' does not exist or cannot be fine-tuned here. "
                   f"Available: {', '.join(sorted(bases))}, or a fine-tuned model of a "
                   "succeeded job.", param="model", code="model_not_found")


def create_job(store: Store, settings: ServeSettings, request, project: str = "default") -> dict:
    """A new job in `project`: its files and starting model must be the project's."""
    base_spec = _starting_model(store, settings, request.model, project)
    for param in ("training_file", "validation_file"):
        file_id = getattr(request, param)
        if file_id is None:
            continue
        row = store.file(file_id, project)
        if row is None:
            raise ApiError(400, f"invalid {param}: no file with id '{file_id}'.", param=param,
                           code="invalid_file")
        if row["purpose"] != "fine-tune":
            raise ApiError(400, f"{param} '{file_id}' has purpose '{row['purpose']}'; upload it "
                           "with purpose='fine-tune'.", param=param, code="invalid_file_purpose")
    _check_method(request.method)
    if request.hyperparameters is not None:
        _check_ranges(request.hyperparameters.model_dump(), "hyperparameters")
    if request.method is not None:
        section = getattr(request.method, request.method.type)
        if section is not None and section.hyperparameters is not None:
            _check_ranges(section.hyperparameters.model_dump(by_alias=True),
                          f"method.{request.method.type}.hyperparameters")
    if request.suffix and not _SUFFIX.fullmatch(request.suffix):
        raise ApiError(400, "suffix may only contain letters, digits, '_', '.' and '-'.",
                       param="suffix")
    hp = request.hyperparameters.model_dump(exclude_none=True) if request.hyperparameters else {}
    job_id = new_id("ftjob-")
    values = {
        "id": job_id, "model": request.model, "base_spec": base_spec,
        "training_file": request.training_file, "validation_file": request.validation_file,
        "hyperparameters": hp, "method": request.method.model_dump(exclude_none=True,
                                                                     by_alias=True)
        if request.method else None, "suffix": request.suffix,
        "seed": request.seed if request.seed is not None else 42, "metadata": request.metadata,
        "status": "validating_files", "result_files": [],
        "run_dir": str(settings.state_dir() / "runs" / job_id),
        "settings": nested_settings(request.settings) or None, "project": project}
    if values["settings"]:  # checked now, as `afinar train` would, not when the job runs
        try:
            train_config(store, settings, values)
        except AfinarError as exc:
            raise ApiError(400, "settings: " + exc.message.replace("invalid config (job):\n  ",
                                                                     ""), param="settings")
    row = store.add_job(values)
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
        objective = OBJECTIVES[(job.get("method") or {}).get("type", "supervised")]
        if objective != "sft" and report.ok and format_family(report.format) != "preference":
            return fail_job(store, job_id, f"invalid_{param}",
                            f"The job failed due to an invalid {param.replace('_', ' ')} "
                            f"'{file_id}' ({row['filename']}): method {objective} needs "
                            f"preference pairs, and this file is in {report.format} format.",
                            param)
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


def get_job(store: Store, job_id: str, project: str | None = None) -> dict:
    """The job, when `project` may see it (None: any project); else OpenAI's 404."""
    job = store.job(job_id, project)
    if job is None:
        raise not_found("fine-tuning job", job_id, "fine_tuning_job_id")
    return job


def cancel_job(store: Store, job_id: str, project: str | None = None) -> dict:
    job = get_job(store, job_id, project)
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


def _job_in(store: Store, job_id: str, status: str, action: str,
            project: str | None) -> dict:
    job = get_job(store, job_id, project)
    if job["status"] != status:
        raise ApiError(400, f"Job {job_id} is {job['status']}; only a {status} job can be "
                       f"{action}.", code="invalid_job_state")
    return job


def pause_job(store: Store, job_id: str, project: str | None = None) -> dict:
    _job_in(store, job_id, "running", "paused", project)
    store.update_job(job_id, when_status=("running",), requested="pause")
    return store.job(job_id)


def resume_job(store: Store, job_id: str, project: str | None = None) -> dict:
    _job_in(store, job_id, "paused", "resumed", project)
    store.update_job(job_id, when_status=("paused",), status="queued", resume=1, requested=None,
                     lease_until=None)
    store.add_event(job_id, "Fine-tuning job resumed; queued")
    return store.job(job_id)


def train_config(store: Store, settings: ServeSettings, job: dict) -> TrainConfig:
    """What `afinar train` would be given for this job. OpenAI's learning_rate_multiplier
    scales afinar's auto learning rate (which depends on the model's size)."""
    hp = effective_hyperparameters(job)
    values = merge_dicts({"keep_checkpoints": 3}, job.get("settings") or {})  # the job's own win
    values.update({
        "data": str(store.file_path(job["training_file"])), "model": job["base_spec"],
        "output": job["run_dir"], "seed": job["seed"], "evaluate": settings.evaluate_jobs,
    })
    if job["validation_file"]:
        values["validation_data"] = str(store.file_path(job["validation_file"]))
    else:
        values["held_out_fraction"] = settings.held_out_fraction
    values["objective"] = OBJECTIVES[(job.get("method") or {}).get("type", "supervised")]
    if hp.get("beta") not in (None, "auto"):
        values["dpo"] = {**values.get("dpo", {}), "beta": float(hp["beta"])}
    if hp.get("lambda") not in (None, "auto"):
        values["orpo"] = {**values.get("orpo", {}), "lambda": float(hp["lambda"])}
    if hp.get("n_epochs") not in (None, "auto"):
        values["epochs"] = int(hp["n_epochs"])
    if hp.get("batch_size") not in (None, "auto"):
        values["batch_size"] = int(hp["batch_size"])
    multiplier = hp.get("learning_rate_multiplier")
    if multiplier not in (None, "auto"):
        values["learning_rate_multiplier"] = float(multiplier)
    return build_config(TrainConfig, values, "job", "see GET /v1/fine_tuning/jobs/settings")


def results_csv(run_dir: Path) -> str:
    """OpenAI's results file: one row per step with training and validation metrics; a
    preference run adds its reward columns."""
    from afinar.evaluation.diagnosis import read_metrics

    rows: dict[int, dict] = {}
    preference = False
    for record in read_metrics(Path(run_dir) / rundir.METRICS_FILE):
        row = rows.setdefault(record["step"], {"step": record["step"]})
        prefix = "train" if record.get("type") == "train" else "valid"
        source = "train" if prefix == "train" else "eval"
        if record.get("type") == "train":
            row.update(train_loss=record.get("train_loss"),
                       train_accuracy=record.get("train_token_accuracy"))
        elif record.get("type") == "eval":
            row.update(valid_loss=record.get("eval_loss"),
                       valid_mean_token_accuracy=record.get("eval_token_accuracy"))
        if f"{source}_reward_margin" in record:
            preference = True
            row.update({f"{prefix}_{name}": record.get(f"{source}_{name}")
                        for name in _PREFERENCE_COLUMNS})
    out = io.StringIO()
    fields = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    if preference:
        fields += [f"{p}_{name}" for p in ("train", "valid") for name in _PREFERENCE_COLUMNS]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for step in sorted(rows):
        writer.writerow({k: "" if rows[step].get(k) is None else rows[step][k] for k in fields})
    return out.getvalue()


_PREFERENCE_COLUMNS = ("preference_accuracy", "reward_margin")


def resolved_hyperparameters(epochs: int, config: TrainConfig) -> dict:
    """OpenAI's hyperparameters object for a job, with `epochs` as the run resolved them."""
    resolved = {"n_epochs": epochs, "batch_size": config.batch_size,
                "learning_rate_multiplier": config.learning_rate_multiplier}
    if config.objective == "dpo":
        resolved["beta"] = config.dpo.beta
    if config.objective == "orpo":
        resolved["lambda"] = config.orpo.lambda_
    return resolved

