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
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from pathlib import Path

from afinar.errors import AfinarError
from afinar.serve import jobs as job_ops
from afinar.serve.ids import now
from afinar.serve.job_run import SETTINGS_ENV, retry_or_fail, train_job
from afinar.serve.settings import ServeSettings, load_serve_settings
from afinar.serve.store import Store
from afinar.train import state as ckpt

POLL_SECONDS = 0.5


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
    lease: in this process, or in the processes of the settings' `launcher`. `worker=None`:
    trains without a lease (a caller that owns the job outright)."""
    job_id = job["id"]
    run = Path(job["run_dir"])
    # A damaged newest checkpoint (bytes changed since it was written) is set aside here, so
    # the events say the step the job really continues from.
    start = ckpt.intact_checkpoint(run, lambda message, level="warning": store.add_event(
        job_id, message[0].upper() + message[1:], level="warn"))
    if worker is not None and not _start_attempt(store, settings, job, before or job, worker,
                                                 start):
        return
    if start is None and run.exists():  # an earlier attempt died before its first checkpoint
        shutil.rmtree(run, ignore_errors=True)
    lease = Lease(store, job_id, worker, settings.lease_seconds) if worker else None
    try:
        if settings.launcher and worker:
            _launch(store, settings, job, worker, start is not None, lease)
        else:
            train_job(store, settings, job, worker, start is not None)
    finally:
        if lease is not None:
            lease.stop()


def _launch(store: Store, settings: ServeSettings, job: dict, worker: str, resume: bool,
            lease: Lease) -> None:
    """The job in the launcher's processes (accelerate launch, torchrun); this worker keeps
    the lease, stops them when it is lost, and records a crash they could not record."""
    logs = store.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{job['id']}-attempt-{job['attempts']}.log"
    cmd = [*shlex.split(settings.launcher), "-m", "afinar.serve.job_run", "--job", job["id"],
           "--worker", worker, "--state", str(store.folder), "--resume", str(int(resume))]
    env = {**os.environ, SETTINGS_ENV: settings.model_dump_json()}
    store.add_event(job["id"], f"Launching: {' '.join(cmd[:len(shlex.split(settings.launcher))])}")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    while proc.poll() is None:
        if lease.lost.wait(0.5):
            _stop_group(proc)
            return
    if proc.returncode != 0 and not lease.lost.is_set():
        tail = log_path.read_text("utf-8", "replace").strip().splitlines()[-5:]
        retry_or_fail(store, settings, job, f"the launched processes exited with status "
                      f"{proc.returncode}: {' / '.join(tail)} (log: {log_path})",
                      {"worker": worker})


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


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
        try:
            run_job(store, settings, job, worker, before)
        except Exception:  # e.g. the database away for longer than a store call waits:
            traceback.print_exc()  # the lease runs out and a worker takes the job over


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
