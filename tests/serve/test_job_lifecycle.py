"""Cancel, pause/resume, and server restarts while jobs are queued and running."""

from __future__ import annotations

import signal
import time

from conftest import write_jsonl
from serving import chat_records, make_server, wait_for


def _wait_checkpoint(client, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(client.fine_tuning.jobs.checkpoints.list(job_id)):
            return
        time.sleep(0.3)
    raise AssertionError("no checkpoint appeared")


def _messages(client, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(
        fine_tuning_job_id=job_id, limit=1000)]


def test_pause_resume_cancel_and_restarts(tmp_path, tiny_model_dir):
    srv = make_server(tmp_path / "life", tiny_model_dir).start()
    try:
        client = srv.client()
        data = write_jsonl(tmp_path / "t.jsonl", chat_records(40))
        file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        long = {"n_epochs": 20, "batch_size": 4}
        a = client.fine_tuning.jobs.create(training_file=file.id, model="tiny",
                                           hyperparameters=long)
        b = client.fine_tuning.jobs.create(training_file=file.id, model="tiny",
                                           hyperparameters={"n_epochs": 1})
        c = client.fine_tuning.jobs.create(training_file=file.id, model="tiny")
        wait_for(client, a.id, statuses=("running",))
        assert wait_for(client, b.id, statuses=("queued",)).status == "queued"

        # A queued job is cancelled at once.
        assert client.fine_tuning.jobs.cancel(c.id).status == "cancelled"

        # Hard crash (SIGKILL to the server and its worker) while A runs and B is queued.
        _wait_checkpoint(client, a.id)
        srv.stop(signal.SIGKILL)
        srv.start()
        client = srv.client()
        assert client.fine_tuning.jobs.retrieve(b.id).status == "queued"
        # The new worker finds A left 'running' by a dead one and continues it first (it is
        # the older job).
        deadline = time.monotonic() + 60
        while not any("resumed from" in m for m in _messages(client, a.id)):
            assert time.monotonic() < deadline, _messages(client, a.id)[:10]
            time.sleep(0.3)
        assert any("stopped renewing its lease" in m for m in _messages(client, a.id))
        assert any("attempt 2 of 3" in m for m in _messages(client, a.id))
        assert client.fine_tuning.jobs.retrieve(b.id).status == "queued"

        # Pause A: the worker moves on to B; resume A: it continues from its checkpoint.
        time.sleep(1)
        client.fine_tuning.jobs.pause(a.id)
        assert wait_for(client, a.id, statuses=("paused",)).status == "paused"
        # The pause checkpointed the step it stopped at, so resuming loses no step.
        paused = next(m for m in _messages(client, a.id) if m.startswith("Fine-tuning job paused"))
        paused_step = int(paused.split("at step ")[1].split(";")[0])
        steps = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(a.id, limit=10)]
        assert paused_step in steps, (paused, steps)
        assert wait_for(client, b.id).status == "succeeded"
        client.fine_tuning.jobs.resume(a.id)
        a_done = wait_for(client, a.id)
        assert a_done.status == "succeeded", a_done.error
        resumed = [m for m in _messages(client, a.id) if "resumed from" in m]
        assert len(resumed) >= 2 and f"step {paused_step}" in resumed[0], resumed
        assert client.fine_tuning.jobs.retrieve(c.id).status == "cancelled"
    finally:
        srv.stop()
