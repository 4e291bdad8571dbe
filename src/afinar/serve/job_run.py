"""One job's training, as a worker runs it: `fine_tune()` with the job's events, checkpoints
and pause/cancel going through the database, and the job's end written there.

A worker runs it in its own process, or, with a `launcher` (serve.yaml or `afinar worker
--launcher`), in the processes that launcher starts:

    accelerate launch --num_processes 8 -m afinar.serve.job_run --job ID --worker W --state S

Then only the main process writes to the job; the worker keeps the lease and stops the
processes if it is lost.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import time
import traceback
from pathlib import Path

from afinar import events as ev
from afinar import rundir
from afinar.errors import AfinarError
from afinar.serve import jobs as job_ops
from afinar.serve.ids import new_id, now
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store
from afinar.train.control import Control, Stopped

REQUEST_CHECK_SECONDS = 0.5
SETTINGS_ENV = "AFINAR_JOB_SETTINGS"  # the worker's settings, as JSON, for launched processes


class _JobControl(Control):
    """Pause or cancel, as the API wrote them into the job's row, or a stop at once when
    another worker holds the job now (this one's lease expired: `lost`). The row is read at
    most every REQUEST_CHECK_SECONDS (the run asks after every step) and the last answer kept,
    also while the database cannot be read."""

    def __init__(self, store: Store, job_id: str, worker: str | None):
        self.store, self.job_id, self.worker = store, job_id, worker
        self.read_at, self.value, self.lost = float("-inf"), None, False

    def requested(self) -> str | None:
        if time.monotonic() - self.read_at >= REQUEST_CHECK_SECONDS:
            self.read_at = time.monotonic()
            try:
                row = self.store.job(self.job_id)
                self.value = row["requested"] if row else None
                self.lost = self.worker is not None and (
                    row is None or row["worker"] != self.worker or row["status"] != "running")
            except Exception:  # the database away for a moment: training goes on
                pass
        if self.lost:
            return "cancel"
        return self.value if self.value in ("pause", "cancel") else None


class _JobEvents:
    """Turns training events into job events, checkpoints and progress; with `worker`, each
    is written only while that worker holds the job."""

    def __init__(self, store: Store, job: dict, config, worker: str | None = None):
        self.store, self.job, self.config = store, job, config
        self.mine = {"worker": worker} if worker else {}
        self.last_eval: dict = {}

    def __call__(self, event: ev.Event) -> None:
        job_id = self.job["id"]
        if isinstance(event, ev.Start):
            resolved = job_ops.resolved_hyperparameters(event.epochs, self.config)
            self.store.update_job(job_id, **self.mine, hyperparameters=resolved)
            self._event(f"Fine-tuning job started: {event.total_steps} steps, "
                        f"{event.train_examples} training examples, "
                        f"{event.held_out_examples} held out")
        elif isinstance(event, ev.Step):
            metrics = event.metrics
            data = {"step": event.step, "train_loss": metrics["train_loss"],
                    "total_steps": event.total_steps}
            if "train_token_accuracy" in metrics:
                data["train_mean_token_accuracy"] = metrics["train_token_accuracy"]
            data.update(_preference_metrics(metrics, "train", "train"))
            self._event(f"Step {event.step}/{event.total_steps}: "
                        f"training loss={metrics['train_loss']:.4f}", type="metrics", data=data)
            self.store.update_job(job_id, **self.mine,
                                  estimated_finish=now() + int(event.eta_s))
        elif isinstance(event, ev.Eval):
            metrics = event.metrics
            self.last_eval = {"valid_loss": metrics["eval_loss"]}
            if "eval_token_accuracy" in metrics:
                self.last_eval["valid_mean_token_accuracy"] = metrics["eval_token_accuracy"]
            self.last_eval.update(_preference_metrics(metrics, "eval", "valid"))
            self._event(f"Step {event.step}: validation loss={metrics['eval_loss']:.4f}",
                        type="metrics", data={"step": event.step, **self.last_eval, **{
                            "full_" + k: v for k, v in self.last_eval.items()}})
        elif isinstance(event, ev.Checkpoint):
            name = f"{self.job['model_name']}:ckpt-step-{event.step}"
            metrics = {"step": event.step, "train_loss": event.train_loss, **self.last_eval}
            self.store.add_checkpoint(job_id, event.step, metrics, name, event.path,
                                      **self.mine)
        elif isinstance(event, ev.Log):
            if "afinar train --resume" in event.message:
                return  # the CLI's hint, with the server's path: a job resumes by itself
            level = {"warning": "warn", "error": "error"}.get(event.level, "info")
            self._event(event.message, level=level)
        elif isinstance(event, ev.EvalPhase):
            self._event("Evaluation: " + event.message)

    def _event(self, message: str, **kw) -> None:
        self.store.add_event(self.job["id"], message, **kw, **self.mine)


def _preference_metrics(metrics: dict, source: str, prefix: str) -> dict:
    """A preference run's reward metrics, named as the event data's other fields."""
    names = ("preference_accuracy", "reward_margin", "chosen_logp_change",
             "rejected_logp_change")
    return {f"{prefix}_{n}": metrics[f"{source}_{n}"] for n in names
            if f"{source}_{n}" in metrics}


def train_job(store: Store, settings: ServeSettings, job: dict, worker: str | None,
              resume: bool) -> None:
    """Trains the job to its end, pause, cancel or failure and records which. `worker`: the
    lease holder; every write to the job names it, so nothing is written once another worker
    has taken the job over. In a multi-process run only the main process writes."""
    from afinar.pipeline import fine_tune
    from afinar.train.recipe import is_main_rank

    job_id, main = job["id"], is_main_rank()
    mine = {"worker": worker} if worker else {}
    control = _JobControl(store, job_id, worker)
    try:
        config = job_ops.train_config(store, settings, job)
        if main:
            store.update_job(job_id, resume=0, **mine)
        listener = _JobEvents(store, job, config, worker) if main else None
        result = fine_tune(config, on_event=listener, resume=resume, control=control)
    except Stopped as stop:
        if control.lost or not main:
            print(f"{job_id}: another worker holds this job now; stopped", flush=True)
            return
        if stop.kind == "pause":
            store.update_job(job_id, status="paused", requested=None, estimated_finish=None,
                             lease_until=None, attempts=max(job["attempts"] - 1, 0), **mine)
            where = f" at step {stop.step}" if stop.step is not None else ""
            store.add_event(job_id, f"Fine-tuning job paused{where}; resume continues from "
                            "there")
        else:
            store.update_job(job_id, status="cancelled", requested=None, finished_at=now(),
                             estimated_finish=None, lease_until=None, **mine)
            store.add_event(job_id, "Fine-tuning job cancelled")
        return
    except AfinarError as exc:  # the job's own problem: another attempt would fail alike
        if main and store.update_job(job_id, when_status=("running",), lease_until=None,
                                     **mine):
            job_ops.fail_job(store, job_id, "training_failed", exc.message +
                             (f" ({exc.hint})" if exc.hint else ""))
        return
    except Exception as exc:  # a crash (a bug, a full disk, a broken checkpoint): try again
        traceback.print_exc()
        if main:
            retry_or_fail(store, settings, job, _problem(exc), mine)
        return
    if main:
        _succeed(store, job, result, mine, control)


def _problem(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f": {exc.filename}" if exc.filename else ""
        return (f"the server's storage is full ({exc.strerror}{where}); nothing half-written "
                "is used: free space in the server's state folder")
    return f"{exc.__class__.__name__}: {exc}"


def retry_or_fail(store: Store, settings: ServeSettings, job: dict, error: str,
                   mine: dict) -> None:
    """Queues the job again, not to be claimed for `retry_seconds` (doubled per attempt; the
    queued job's lease_until holds the moment), or fails it when out of attempts; the guarded
    updates change nothing when this worker no longer holds the job."""
    job_id, held = job["id"], {"when_status": ("running",), **mine}
    if job["attempts"] < settings.max_attempts:
        delay = settings.retry_seconds * 2 ** (job["attempts"] - 1)
        if store.update_job(job_id, status="queued", lease_until=time.time() + delay, resume=1,
                            **held):
            when = f" and starts again in {delay:.0f} s at the earliest" if delay >= 1 else ""
            store.add_event(job_id, f"Attempt {job['attempts']} of {settings.max_attempts} "
                            f"failed: {error}; the job is queued again{when}", level="warn")
    elif store.update_job(job_id, lease_until=None, **held):
        job_ops.fail_job(store, job_id, "server_error", error)


def worker_holds(store: Store, job_id: str, mine: dict) -> bool:
    row = store.job(job_id)
    return row is not None and row["status"] == "running" and \
        (not mine or row["worker"] == mine["worker"])


def _succeed(store: Store, job: dict, result, mine: dict, control: _JobControl) -> None:
    job_id = job["id"]
    if control.lost or not worker_holds(store, job_id, mine):
        print(f"{job_id}: finished, but another worker holds it now; not recorded", flush=True)
        return
    results_id = new_id("file-")
    text = job_ops.results_csv(result.run_dir)
    rundir.write_text_atomic(store.file_path(results_id), text)
    store.add_file(results_id, "step_metrics.csv", len(text.encode()), "fine-tune-results",
                   project=job.get("project") or "default")
    info = rundir.read_run_info(result.run_dir)
    if not store.update_job(job_id, when_status=("running",), status="succeeded",
                            finished_at=now(), estimated_finish=None, lease_until=None,
                            fine_tuned_model=job["model_name"], result_files=[results_id],
                            trained_tokens=int(info.get("summary", {}).get("tokens_seen") or 0),
                            **mine):
        return
    store.add_event(job_id, f"New fine-tuned model created: {job['model_name']}")
    store.add_event(job_id, "The job has successfully completed")


def main() -> None:
    """A launched job process (see the module docstring)."""
    parser = argparse.ArgumentParser(description="one afinar job, in launched processes")
    parser.add_argument("--job", required=True)
    parser.add_argument("--worker", required=True)
    parser.add_argument("--state", required=True)
    parser.add_argument("--resume", type=int, default=0)
    args = parser.parse_args()
    settings = ServeSettings.model_validate(json.loads(os.environ[SETTINGS_ENV]))
    store = Store(Path(args.state), settings.database_url)
    try:
        train_job(store, settings, store.job(args.job), args.worker, bool(args.resume))
    finally:
        store.close()


if __name__ == "__main__":
    main()
