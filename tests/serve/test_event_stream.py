"""GET /v1/fine_tuning/jobs/{id}/events/stream (afinar's extension): a job's events as
server-sent events from a cursor, with its status changes, ending at its final status; read
with a plain HTTP client against a real server, as the dashboard reads it."""

from __future__ import annotations

import json
import urllib.request

from conftest import write_jsonl
from serving import chat_records


def _read_stream(url: str) -> list[tuple[str, str | None, dict]]:
    """(event name, id, data) of every message, until the server ends the stream."""
    messages, name, ident, data = [], "message", None, ""
    with urllib.request.urlopen(url, timeout=300) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw_line in response:
            line = raw_line.decode().rstrip("\n")
            if line == "":
                if data:
                    messages.append((name, ident, json.loads(data)))
                name, ident, data = "message", None, ""
            elif line.startswith("event: "):
                name = line[7:]
            elif line.startswith("id: "):
                ident = line[4:]
            elif line.startswith("data: "):
                data += line[6:]
    return messages


def test_a_job_streams_its_events_from_a_cursor_to_its_final_status(server, client, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(16))
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=file.id, model="tiny",
                                         hyperparameters={"n_epochs": 2})
    base = f"{server.url}/fine_tuning/jobs/{job.id}/events/stream"
    messages = _read_stream(base)  # from the first event, live, until the job ends

    statuses = [m[2]["status"] for m in messages if m[0] == "job"]
    assert statuses[-1] == "succeeded" and len(statuses) == len(set(statuses)) >= 2
    events = [m for m in messages if m[0] == "event"]
    assert all(ident == body["id"] for _, ident, body in events)
    listed = client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=1000).data
    assert [e[2]["id"] for e in events] == [e.id for e in reversed(listed)]  # oldest first
    steps = [e[2]["data"]["step"] for e in events if "train_loss" in e[2]["data"]]
    assert steps == sorted(steps) and len(steps) >= 2

    # A client reconnecting with its last id gets only what came after it.
    middle = events[len(events) // 2][1]
    again = [m[2]["id"] for m in _read_stream(f"{base}?after={middle}") if m[0] == "event"]
    assert again == [e[2]["id"] for e in events[len(events) // 2 + 1:]]
    config = json.loads(urllib.request.urlopen(
        f"{server.url}/fine_tuning/jobs/{job.id}/config").read())
    assert "learning_rate" in config["config"]
