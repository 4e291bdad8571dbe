"""The job worker: a process of its own that trains queued jobs one at a time.

    python -m afinar.serve.worker --state STATE_DIR [--config serve.yaml] [--parent PID]

`afinar serve` starts `concurrent_jobs` of them and the web process stays responsive while they
train. Each calls the same `fine_tune()` (and so the same end-of-run evaluation) as `afinar
train`, with a control that pauses or cancels at a step (train/control.py).
On start, a worker recovers jobs whose worker died: a running job continues from its last
checkpoint, or fails with the reason when it had none; nothing stays 'running' forever.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from pathlib import Path

from afinar import events as ev
from afinar import rundir
from afinar.errors import AfinarError
from afinar.serve import jobs as job_ops
from afinar.serve.ids import new_id, now
from afinar.serve.settings import ServeSettings, load_serve_settings
from afinar.serve.store import Store
from afinar.train import state as ckpt
from afinar.train.control import Control, Stopped

POLL_SECONDS = 0.5
REQUEST_CHECK_SECONDS = 0.5


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(store: Store) -> None:
    """Jobs left 'running' by a worker that is gone (server killed or restarted)."""
    for job in store.jobs_in("running"):
        if _alive(job["worker_pid"]) and job["worker_pid"] != os.getpid():
            continue
        has_checkpoint = ckpt.latest_checkpoint(Path(job["run_dir"])) is not None
        if job["requested"] == "cancel":
            store.update_job(job["id"], status="cancelled", finished_at=now(), requested=None)
        elif has_checkpoint:
            store.update_job(job["id"], when_status=("running",), status="queued", resume=1,
                             worker_pid=None)
            store.add_event(job["id"], "The server restarted while this job was running; it "
                            "continues from its last checkpoint", level="warn")
        else:
            message = ("The server stopped before this job saved its first checkpoint, so it "
                       "cannot be resumed; create the job again")
            store.update_job(job["id"], status="failed", finished_at=now(), worker_pid=None,
                             error={"code": "server_restarted", "message": message,
                                    "param": None})
            store.add_event(job["id"], message, level="error")


class _JobControl(Control):
    """Pause or cancel, as the API wrote them into the job's row; the row is read at most every
    REQUEST_CHECK_SECONDS (the run asks after every step) and the last answer kept."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id
        self.read_at, self.value = float("-inf"), None

    def requested(self) -> str | None:
        if time.monotonic() - self.read_at >= REQUEST_CHECK_SECONDS:
            self.read_at = time.monotonic()
            row = self.store.job(self.job_id)
            self.value = row["requested"] if row else None
        return self.value if self.value in ("pause", "cancel") else None


class _JobEvents:
    """Turns training events into job events, checkpoints and progress."""

    def __init__(self, store: Store, job: dict, config):
        self.store, self.job, self.config = store, job, config
        self.last_eval: dict = {}

    def __call__(self, event: ev.Event) -> None:
        job_id = self.job["id"]
        if isinstance(event, ev.Start):
            self.store.update_job(job_id, hyperparameters=job_ops.resolved_hyperparameters(
                event.epochs, self.config))
            self.store.add_event(job_id, f"Fine-tuning job started: {event.total_steps} "
                                 f"steps, {event.train_examples} training examples, "
                                 f"{event.held_out_examples} held out")
        elif isinstance(event, ev.Step):
            metrics = event.metrics
            data = {"step": event.step, "train_loss": metrics["train_loss"],
                    "total_steps": event.total_steps}
            if "train_token_accuracy" in metrics:
                data["train_mean_token_accuracy"] = metrics["train_token_accuracy"]
            data.update(_preference_metrics(metrics, "train", "train"))
            self.store.add_event(job_id, f"Step {event.step}/{event.total_steps}: "
                                 f"training loss={metrics['train_loss']:.4f}", type="metrics",
                                 data=data)
            self.store.update_job(job_id, estimated_finish=now() + int(event.eta_s))
        elif isinstance(event, ev.Eval):
            metrics = event.metrics
            self.last_eval = {"valid_loss": metrics["eval_loss"]}
            if "eval_token_accuracy" in metrics:
                self.last_eval["valid_mean_token_accuracy"] = metrics["eval_token_accuracy"]
            self.last_eval.update(_preference_metrics(metrics, "eval", "valid"))
            self.store.add_event(job_id, f"Step {event.step}: validation loss="
                                 f"{metrics['eval_loss']:.4f}", type="metrics",
                                 data={"step": event.step, **self.last_eval,
                                       **{"full_" + k: v for k, v in self.last_eval.items()}})
        elif isinstance(event, ev.Checkpoint):
            name = f"{self.job['model_name']}:ckpt-step-{event.step}"
            metrics = {"step": event.step, "train_loss": event.train_loss, **self.last_eval}
            self.store.add_checkpoint(job_id, event.step, metrics, name, event.path)
        elif isinstance(event, ev.Log):
            level = {"warning": "warn", "error": "error"}.get(event.level, "info")
            self.store.add_event(job_id, event.message, level=level)
        elif isinstance(event, ev.EvalPhase):
            self.store.add_event(job_id, "Evaluation: " + event.message)


def _preference_metrics(metrics: dict, source: str, prefix: str) -> dict:
    """A preference run's reward metrics, named as the event data's other fields."""
    names = ("preference_accuracy", "reward_margin", "chosen_logp_change",
             "rejected_logp_change")
    return {f"{prefix}_{n}": metrics[f"{source}_{n}"] for n in names
            if f"{source}_{n}" in metrics}


def run_job(store: Store, settings: ServeSettings, job: dict) -> None:
    from afinar.pipeline import fine_tune

    job_id = job["id"]
    resume = bool(job["resume"]) and ckpt.latest_checkpoint(Path(job["run_dir"])) is not None
    try:
        config = job_ops.train_config(store, settings, job)
        store.update_job(job_id, resume=0)
        result = fine_tune(config, on_event=_JobEvents(store, job, config), resume=resume,
                           control=_JobControl(store, job_id))
    except Stopped as stop:
        if stop.kind == "pause":
            store.update_job(job_id, status="paused", requested=None, estimated_finish=None)
            where = f" at step {stop.step}" if stop.step is not None else ""
            store.add_event(job_id, f"Fine-tuning job paused{where}; resume continues from "
                            "there")
        else:
            store.update_job(job_id, status="cancelled", requested=None, finished_at=now(),
                             estimated_finish=None)
            store.add_event(job_id, "Fine-tuning job cancelled")
        return
    except AfinarError as exc:
        job_ops.fail_job(store, job_id, "training_failed", exc.message +
                      (f" ({exc.hint})" if exc.hint else ""))
        return
    except Exception as exc:  # a bug: the job fails with its reason, the worker lives on
        traceback.print_exc()
        job_ops.fail_job(store, job_id, "server_error", f"{exc.__class__.__name__}: {exc}")
        return
    results_id = new_id("file-")
    text = job_ops.results_csv(result.run_dir)
    rundir.write_text_atomic(store.file_path(results_id), text)
    store.add_file(results_id, "step_metrics.csv", len(text.encode()), "fine-tune-results")
    info = rundir.read_run_info(result.run_dir)
    store.update_job(job_id, status="succeeded", finished_at=now(), estimated_finish=None,
                     fine_tuned_model=job["model_name"], result_files=[results_id],
                     trained_tokens=int(info.get("summary", {}).get("tokens_seen") or 0))
    store.add_event(job_id, f"New fine-tuned model created: {job['model_name']}")
    store.add_event(job_id, "The job has successfully completed")


def serve_forever(store: Store, settings: ServeSettings, parent: int | None = None) -> None:
    recover(store)
    while True:
        if parent and not _alive(parent):
            return  # the web process is gone: so are we
        job = store.claim_job(os.getpid())
        if job is None:
            time.sleep(POLL_SECONDS)
            continue
        store.add_event(job["id"], "Fine-tuning job running")
        run_job(store, settings, job)


def main() -> None:
    parser = argparse.ArgumentParser(description="afinar's fine-tuning job worker")
    parser.add_argument("--config", default=None)
    parser.add_argument("--state", default=None)
    parser.add_argument("--parent", type=int, default=None)
    args = parser.parse_args()
    settings = load_serve_settings(args.config, home=args.state)
    serve_forever(Store(settings.state_dir()), settings, args.parent)


if __name__ == "__main__":
    main()
