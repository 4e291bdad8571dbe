"""The job worker: a process that trains queued jobs one at a time, on this machine or another.

    afinar worker --config serve.yaml          # one per GPU or machine
    python -m afinar.serve.worker --state STATE_DIR [--config serve.yaml] [--parent PID]

`afinar serve` starts `concurrent_jobs` of them itself (none with `--no-worker`). Workers on
other machines share the server's database (database_url / AFINAR_DATABASE_URL: PostgreSQL)
and its state folder (a mount every machine sees: uploads, runs, checkpoints).

A worker claims a job with a lease (store.claim_job: FOR UPDATE SKIP LOCKED on PostgreSQL) and
renews it every third of `lease_seconds` while it trains. A worker that dies (SIGKILL, a machine
that vanishes) stops renewing; once its lease expires another worker takes the job over and
continues from its last checkpoint (or from the start when it had none), and the job's events
say so ("attempt 2 of 3"). A worker that finds its lease taken stops training at once and
writes nothing more to the job. After `max_attempts` starts the job fails with the last error.
Each calls the same `fine_tune()` (and so the same end-of-run evaluation) as `afinar train`,
with a control that pauses or cancels at a step (train/control.py).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import threading
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


def worker_name() -> str:
    """host:pid:random, unique across machines and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


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


def expire_dead_local_workers(store: Store) -> None:
    """A job whose worker ran on this machine and is gone (the server was killed or
    restarted) need not wait for its lease to run out: its lease ends now."""
    host = socket.gethostname()
    for job in store.jobs_in("running"):
        parts = (job["worker"] or "").split(":")
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() \
                and not _alive(int(parts[1])):
            store.update_job(job["id"], when_status=("running",), worker=job["worker"],
                             lease_until=0)


class Lease:
    """Renews a job's lease in a thread while the job trains. `lost` is set when another
    worker holds the job now (this one was too slow, or the database was unreachable for
    longer than the lease); the job's control then stops the run."""

    def __init__(self, store: Store, job_id: str, worker: str, seconds: float):
        self.store, self.job_id, self.worker, self.seconds = store, job_id, worker, seconds
        self.lost, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._done.wait(self.seconds / 3):
            try:
                if not self.store.renew_lease(self.job_id, self.worker, self.seconds):
                    self.lost.set()
                    return
            except Exception as exc:  # the database away: try again at the next tick
                print(f"lease renewal of {self.job_id} failed: {exc}", flush=True)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)


class _JobControl(Control):
    """Pause or cancel, as the API wrote them into the job's row, or a stop at once when the
    lease was lost; the row is read at most every REQUEST_CHECK_SECONDS (the run asks after
    every step) and the last answer kept, also while the database cannot be read."""

    def __init__(self, store: Store, job_id: str, lease: Lease | None = None):
        self.store, self.job_id, self.lease = store, job_id, lease
        self.read_at, self.value = float("-inf"), None

    def requested(self) -> str | None:
        if self.lease is not None and self.lease.lost.is_set():
            return "cancel"
        if time.monotonic() - self.read_at >= REQUEST_CHECK_SECONDS:
            self.read_at = time.monotonic()
            try:
                row = self.store.job(self.job_id)
                self.value = row["requested"] if row else None
            except Exception:  # the database away for a moment: training goes on
                pass
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


def _start_attempt(store: Store, settings: ServeSettings, job: dict, before: dict,
                   worker: str, step: Path | None) -> bool:
    """Says in the job's events which attempt this is and why; settles a job that must not run
    again (cancelled while its worker was lost, or out of attempts). True: train it."""
    job_id, attempt, limit = job["id"], job["attempts"], settings.max_attempts
    taken_over = before["status"] == "running"  # its worker's lease had expired
    if taken_over:
        where = (f"continues from its checkpoint at step {_step_of(step)}" if step
                 else "starts again from the beginning (no checkpoint was saved)")
        store.add_event(job_id, f"The worker {before['worker']} stopped renewing its lease "
                        f"(it died or its machine is unreachable); this job {where}",
                        level="warn")
        if before["requested"] in ("cancel", "pause"):
            final = "cancelled" if before["requested"] == "cancel" else "paused"
            store.update_job(job_id, worker=worker, status=final, requested=None,
                             lease_until=None, resume=1,
                             **({"finished_at": now()} if final == "cancelled" else {}))
            store.add_event(job_id, f"Fine-tuning job {final}")
            return False
    if attempt > limit:
        job_ops.fail_job(store, job_id, "too_many_attempts",
                         f"The job was started {attempt - 1} times and did not finish "
                         f"(max_attempts: {limit}); the last: "
                         f"{_last_problem(store, job_id)}")
        store.update_job(job_id, lease_until=None)
        return False
    store.add_event(job_id, f"Fine-tuning job running (attempt {attempt} of {limit}, "
                    f"worker {worker})")
    return True


def _step_of(checkpoint: Path) -> str:
    return checkpoint.name.split("-")[-1]


def _last_problem(store: Store, job_id: str) -> str:
    warnings = [e for e in store.events(job_id, limit=50) if e["level"] in ("warn", "error")]
    return warnings[0]["message"] if warnings else "unknown"


def run_job(store: Store, settings: ServeSettings, job: dict, worker: str | None = None,
            before: dict | None = None) -> None:
    """Trains a claimed job to its end (or its pause, cancel or failure) while holding its
    lease. `worker=None`: trains without a lease (a caller that owns the job outright)."""
    from afinar.pipeline import fine_tune

    job_id = job["id"]
    run = Path(job["run_dir"])
    # A damaged newest checkpoint (bytes changed since it was written) is set aside here, so
    # the events say the step the job really continues from.
    start = ckpt.intact_checkpoint(run, lambda message, level="warning": store.add_event(
        job_id, message[0].upper() + message[1:], level="warn"))
    if worker is not None and not _start_attempt(store, settings, job, before or job, worker,
                                                 start):
        return
    resume = start is not None
    if not resume and run.exists():  # an earlier attempt died before its first checkpoint
        shutil.rmtree(run, ignore_errors=True)
    lease = Lease(store, job_id, worker, settings.lease_seconds) if worker else None
    mine = {"worker": worker} if worker else {}
    try:
        config = job_ops.train_config(store, settings, job)
        store.update_job(job_id, resume=0, **mine)
        result = fine_tune(config, on_event=_JobEvents(store, job, config), resume=resume,
                           control=_JobControl(store, job_id, lease))
    except Stopped as stop:
        if lease is not None and lease.lost.is_set():
            print(f"{job_id}: lease lost to another worker; stopped", flush=True)
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
        if store.update_job(job_id, when_status=("running",), lease_until=None, **mine):
            job_ops.fail_job(store, job_id, "training_failed", exc.message +
                             (f" ({exc.hint})" if exc.hint else ""))
        return
    except Exception as exc:  # a crash (a bug, a full disk, a broken checkpoint): try again
        traceback.print_exc()
        _retry_or_fail(store, settings, job, f"{exc.__class__.__name__}: {exc}", mine)
        return
    finally:
        if lease is not None:
            lease.stop()
    _succeed(store, job, result, mine, lease)


def _retry_or_fail(store: Store, settings: ServeSettings, job: dict, error: str,
                   mine: dict) -> None:
    job_id = job["id"]
    if job["attempts"] < settings.max_attempts and worker_holds(store, job_id, mine):
        store.update_job(job_id, status="queued", lease_until=None, resume=1, **mine)
        store.add_event(job_id, f"Attempt {job['attempts']} of {settings.max_attempts} "
                        f"failed: {error}; the job is queued again", level="warn")
    elif store.update_job(job_id, when_status=("running",), lease_until=None, **mine):
        job_ops.fail_job(store, job_id, "server_error", error)


def worker_holds(store: Store, job_id: str, mine: dict) -> bool:
    row = store.job(job_id)
    return row is not None and row["status"] == "running" and \
        (not mine or row["worker"] == mine["worker"])


def _succeed(store: Store, job: dict, result, mine: dict, lease: Lease | None) -> None:
    job_id = job["id"]
    if lease is not None and lease.lost.is_set() or not worker_holds(store, job_id, mine):
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


def serve_forever(store: Store, settings: ServeSettings, parent: int | None = None,
                  stop: threading.Event | None = None) -> None:
    """Claims and trains jobs until `parent` (the web process that started this worker) is
    gone or `stop` is set."""
    worker = worker_name()
    print(f"afinar worker {worker}: database {store.db.describe()}, state {store.folder}",
          flush=True)
    while not (stop and stop.is_set()):
        if parent and not _alive(parent):
            return  # the web process is gone: so are we
        try:
            expire_dead_local_workers(store)
            claimed = store.claim_job(worker, settings.lease_seconds)
        except AfinarError as exc:  # the database is away: wait for it
            print(f"cannot claim jobs: {exc.message}", flush=True)
            time.sleep(POLL_SECONDS * 4)
            continue
        if claimed is None:
            time.sleep(POLL_SECONDS)
            continue
        job, before = claimed
        run_job(store, settings, job, worker, before)


def main() -> None:
    parser = argparse.ArgumentParser(description="afinar's fine-tuning job worker")
    parser.add_argument("--config", default=None)
    parser.add_argument("--state", default=None)
    parser.add_argument("--parent", type=int, default=None)
    args = parser.parse_args()
    settings = load_serve_settings(args.config, home=args.state)
    serve_forever(Store(settings.state_dir(), settings.database_url), settings, args.parent)


if __name__ == "__main__":
    main()
