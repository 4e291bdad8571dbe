"""Workers on "several machines": `afinar serve --no-worker` and two `afinar worker` processes
sharing a real PostgreSQL server and a state folder. A worker killed with SIGKILL mid-training
lets its lease expire; the other one takes the job over from its last checkpoint, the events
say which attempt it is, the job succeeds exactly once, and its adapter is the one an
uninterrupted run of the same job gives."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from serving import AFINAR, chat_records, make_server, wait_for

pytestmark = pytest.mark.slow


def _start_worker(folder, config, index: int) -> subprocess.Popen:
    log = open(folder / f"worker-{index}.log", "ab")
    return subprocess.Popen([AFINAR, "worker", "--config", str(config)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _messages(client, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(
        fine_tuning_job_id=job_id, limit=1000)][::-1]


def test_a_killed_workers_job_is_taken_over_from_its_checkpoint(tmp_path, tiny_model_dir,
                                                              postgres_url):
    from afinar.serve.store import Store

    srv = make_server(tmp_path / "team", tiny_model_dir, database_url=postgres_url,
                      lease_seconds=3, engine="transformers")
    srv.start(args=("--no-worker",))
    workers = [_start_worker(srv.folder, srv.config, i) for i in range(2)]
    store = Store(srv.folder / "state", postgres_url)
    try:
        client = srv.client()
        data = write_jsonl(tmp_path / "t.jsonl", chat_records(40))
        file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        job_args = dict(training_file=file.id, model="tiny", seed=7,
                        hyperparameters={"n_epochs": 6, "batch_size": 4},
                        extra_body={"settings": {"save_steps": 5, "eval_steps": 5}})
        reference = client.fine_tuning.jobs.create(**job_args)
        assert wait_for(client, reference.id).status == "succeeded"

        job = client.fine_tuning.jobs.create(**job_args)
        run = srv.folder / "state" / "runs" / job.id
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("step-*")):
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        holder = store.job(job.id)["worker"]
        pid = int(holder.split(":")[1])
        os.kill(pid, signal.SIGKILL)  # mid-step, after its first checkpoint

        done = wait_for(client, job.id, timeout=300)
        assert done.status == "succeeded", done.error
        messages = _messages(client, job.id)
        assert any("attempt 1 of 3" in m for m in messages)
        takeover = next(m for m in messages if "stopped renewing its lease" in m)
        assert holder in takeover and "continues from its checkpoint at step" in takeover
        assert any("attempt 2 of 3" in m for m in messages)
        assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1
        assert store.job(job.id)["worker"] != holder

        ours = load_file(run / "adapter" / "adapter_model.safetensors")
        theirs = load_file(srv.folder / "state" / "runs" / reference.id / "adapter" /
                           "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    finally:
        store.close()
        for proc in workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
        srv.stop()


def test_a_job_out_of_attempts_fails_with_the_last_problem(tmp_path, tiny_model_dir):
    """The third worker lost on one job: it is not trained a fourth time."""
    from afinar.serve.settings import ServeSettings
    from afinar.serve.store import Store
    from afinar.serve.worker import run_job

    store = Store(tmp_path / "state")
    store.add_job({"id": "ftjob-doomed", "model": "tiny", "base_spec": str(tiny_model_dir),
                   "training_file": "file-x", "status": "running", "attempts": 3,
                   "worker": "elsewhere:1:abc", "lease_until": 0, "result_files": [],
                   "run_dir": str(tmp_path / "runs" / "ftjob-doomed")})
    job, before = store.claim_job("w-new", 60)
    run_job(store, ServeSettings(max_attempts=3), job, "w-new", before)
    row = store.job("ftjob-doomed")
    assert row["status"] == "failed" and row["error"]["code"] == "too_many_attempts"
    assert "started 3 times" in row["error"]["message"]
    assert "stopped renewing its lease" in row["error"]["message"]
    store.close()


def test_a_worker_launches_a_multi_process_job(tmp_path, tiny_model_dir):
    """`launcher`: the job trains in the processes torchrun starts (DDP over 2 CPU processes
    here); only the main one writes to the job; the worker holds the lease meanwhile."""
    import sys
    from pathlib import Path

    from serving import free_port

    torchrun = Path(sys.executable).parent / "torchrun"
    srv = make_server(tmp_path / "ddp", tiny_model_dir, engine="transformers",
                      launcher=f"{torchrun} --nproc_per_node 2 --master_port {free_port()}")
    srv.start()
    try:
        client = srv.client()
        data = write_jsonl(tmp_path / "t.jsonl", chat_records(16))
        file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=file.id, model="tiny",
                                             hyperparameters={"n_epochs": 1, "batch_size": 4})
        done = wait_for(client, job.id, timeout=300)
        logs = list((srv.folder / "state" / "logs").glob(f"{job.id}-attempt-1.log"))
        assert done.status == "succeeded", (done.error, logs and logs[0].read_text()[-3000:])
        messages = _messages(client, job.id)
        assert any(m.startswith("Launching: ") and "torchrun" in m for m in messages)
        assert sum(m.startswith("New fine-tuned model created") for m in messages) == 1
        assert sum(m.startswith("Fine-tuning job started") for m in messages) == 1  # main only
        from afinar import rundir

        info = rundir.read_run_info(srv.folder / "state" / "runs" / job.id)
        assert info["summary"]["processes"] == 2
    finally:
        srv.stop()
