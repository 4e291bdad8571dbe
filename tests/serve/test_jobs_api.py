"""/v1/fine_tuning/jobs with the real openai client against a real server and worker."""

from __future__ import annotations

import csv
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import write_jsonl
from serving import chat_records, wait_for


@pytest.fixture(scope="module")
def training_file(server, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("jobs") / "train.jsonl", chat_records(40))
    return server.client().files.create(file=open(data, "rb"), purpose="fine-tune")


@pytest.fixture(scope="module")
def finished_job(server, training_file):
    client = server.client()
    job = client.fine_tuning.jobs.create(
        training_file=training_file.id, model="tiny", suffix="triage", seed=7,
        metadata={"team": "soporte"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 10}}})
    assert job.status == "validating_files" and job.object == "fine_tuning.job"
    return wait_for(client, job.id)


def test_a_job_runs_to_success_with_openai_fields(finished_job, client):
    job = finished_job
    assert job.status == "succeeded", job.error
    assert re.fullmatch(r"ft:tiny:afinar:triage:[A-Za-z0-9]+", job.fine_tuned_model)
    assert job.fine_tuned_model.endswith(job.id.split("-", 1)[1])
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(10)
    assert job.seed == 7 and job.metadata == {"team": "soporte"}
    assert job.method.type == "supervised"
    assert job.organization_id == "afinar"


def test_the_worker_trains_and_evaluates_like_the_cli(finished_job, server):
    run = server.folder / "state" / "runs" / finished_job.id
    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.html"):
        assert (run / name).is_file(), name
    info = (run / "run.json").read_text()
    assert '"status": "succeeded"' in info


def test_events_carry_step_metrics(finished_job, client):
    events = list(client.fine_tuning.jobs.list_events(fine_tuning_job_id=finished_job.id,
                                                      limit=100))
    assert events[0].message == "The job has successfully completed"  # newest first
    metrics = [e.data for e in events if e.type == "metrics"]
    train = [d for d in metrics if "train_loss" in d]
    valid = [d for d in metrics if "valid_loss" in d]
    assert len(train) == 16 and {d["step"] for d in train} == set(range(1, 17))
    assert valid and all(d["valid_loss"] > 0 for d in valid)
    assert any("Validating training file" in e.message for e in events)


def test_checkpoints_results_file_and_chat_with_them(finished_job, client):
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(finished_job.id))
    assert 1 <= len(checkpoints) <= 3
    newest = checkpoints[0]
    assert newest.fine_tuned_model_checkpoint == f"{finished_job.fine_tuned_model}:ckpt-step-16"
    assert newest.step_number == 16 and newest.metrics.train_loss > 0
    results = client.files.retrieve(finished_job.result_files[0])
    assert results.purpose == "fine-tune-results"
    rows = list(csv.DictReader(io.StringIO(client.files.content(results.id).text)))
    assert [int(r["step"]) for r in rows] == list(range(0, 17))
    for model in (finished_job.fine_tuned_model, checkpoints[-1].fine_tuned_model_checkpoint):
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "pedido 3 llegó roto"}],
            max_tokens=8, temperature=0)
        assert answer.model == model and answer.usage.completion_tokens <= 8


def test_fine_tunes_answer_through_llama_cpp_adapters_chosen_per_request(finished_job, client,
                                                                       server):
    """One llama-server child for the base "tiny": the fine-tune and its checkpoint are LoRA
    adapters on it, chosen per request; answers equal those of the run opened directly on the
    same engine, also when the three models are asked at once."""
    import psutil

    from afinar.engines import open_model

    listed = {m.id: m.model_extra.get("engine") for m in client.models.list()}
    assert listed["tiny"] == listed[finished_job.fine_tuned_model] == "llama.cpp"
    checkpoint = list(client.fine_tuning.jobs.checkpoints.list(finished_job.id))[-1]
    models = ["tiny", finished_job.fine_tuned_model, checkpoint.fine_tuned_model_checkpoint]
    question = [{"role": "user", "content": "pedido 3 llegó roto"}]

    def ask(model: str, max_tokens: int = 12) -> str:
        return client.chat.completions.create(model=model, messages=question, temperature=0,
                                              max_tokens=max_tokens).choices[0].message.content
    alone = [ask(m) for m in models]
    first = [ask(m, 3) for m in models]  # the trained format's first tokens: no near-tie there
    run = open_model(str(server.folder / "state" / "runs" / finished_job.id), "llamacpp",
                     notify=lambda message: None)
    try:
        from afinar.infer.generate import GenerationSettings

        direct = run.complete([question], GenerationSettings(max_new_tokens=12))[0].text
    finally:
        run.close()
    assert alone[1] == direct and alone[0] != alone[1]
    # Asked at once, each request gets its own adapter (3 tokens: answers batched together may
    # part at a near-tie further on, docs/serving.md).
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda m: ask(m, 3), models * 2))
    assert together == first * 2 and len(set(first)) > 1
    # A child killed mid-answer: that request gets a 503 at once, the next one a restarted child.
    # The API process's own children (workers' evaluations start theirs, further down).
    children = [p for p in psutil.Process(server.proc.pid).children()
                if p.name() == "llama-server"]
    assert len(children) == 1, "one child for the base and all its adapters"
    failed: list[BaseException] = []

    def answer():
        try:
            ask(models[1], max_tokens=64)
        except openai.APIStatusError as exc:
            failed.append(exc)
    # Frozen first, so that the request is surely in flight when the child dies.
    children[0].suspend()
    worker = threading.Thread(target=answer)
    worker.start()
    time.sleep(0.5)
    children[0].kill()
    worker.join(timeout=30)
    assert not worker.is_alive() and failed and failed[0].status_code == 503
    assert failed[0].body["code"] == "engine_unavailable"
    assert ask(models[1]) == alone[1]


def test_a_bad_training_file_fails_the_job_naming_the_line(client, tmp_path):
    lines = [{"messages": r["messages"]} for r in chat_records(12)]
    lines[4] = {"messages": [{"role": "user", "content": "hola"}, {"role": "asistente",
                                                                  "content": "x"}]}
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    uploaded = client.files.create(file=open(bad, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny")
    job = wait_for(client, job.id)
    assert job.status == "failed"
    assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
    assert "line 5" in job.error.message and "role" in job.error.message


def test_create_errors_are_4xx_in_openai_envelope(client, training_file):
    with pytest.raises(openai.NotFoundError) as info:
        client.fine_tuning.jobs.create(training_file=training_file.id, model="gpt-9")
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(training_file="file-nope", model="tiny")
    assert info.value.body["param"] == "training_file"
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.create(training_file=training_file.id, model="tiny",
                                       method={"type": "reinforcement"})
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.cancel("ftjob-nope")


def test_listing_pages_through_every_job_and_stops(client, tmp_path):
    bad = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "x"}])  # fails validation at once
    uploaded = client.files.create(file=open(bad, "rb"), purpose="fine-tune")
    created = [client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny").id
               for _ in range(5)]
    first = client.fine_tuning.jobs.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    seen = [job.id for job in client.fine_tuning.jobs.list(limit=2)]  # auto-paginates
    assert len(seen) == len(set(seen)) and set(created) <= set(seen)
    assert seen[:5] == created[::-1]  # newest first
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100,
                                                       metadata={"team": "soporte"})]
