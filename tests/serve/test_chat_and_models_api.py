"""/v1/chat/completions and /v1/models with the real openai client; API keys. Chat is the web
process's alone, so those tests run in-process (serving.in_process); models of fine-tuning jobs
and API keys need the real server."""

from __future__ import annotations

import json
import threading
import urllib.parse

import openai
import pytest

from conftest import write_jsonl
from serving import chat_records, make_server, raw, wait_for

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


@pytest.fixture
def chat(in_process):
    return in_process.client()


def test_chat_completion_counts_tokens_and_reports_length(chat):
    answer = chat.chat.completions.create(model="tiny", messages=HELLO, max_tokens=7,
                                          temperature=0)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.index == 0
    assert answer.usage.completion_tokens <= 7
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    if answer.usage.completion_tokens == 7:
        assert choice.finish_reason == "length"
    # max_completion_tokens is the newer name of the same limit; greedy answers repeat.
    again = chat.chat.completions.create(model="tiny", messages=HELLO,
                                         max_completion_tokens=7, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_streaming_ends_with_done_and_usage(chat, in_process):
    stream = chat.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6,
                                          temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = chat.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6,
                                        temperature=0)
    assert text.strip() == full.choices[0].message.content
    # On the wire: server-sent events, the last one `data: [DONE]`.
    status, body = in_process.raw("POST", "/chat/completions", json.dumps(
        {"model": "tiny", "messages": HELLO, "max_tokens": 3, "stream": True}).encode(),
        headers={"Content-Type": "application/json"})
    events = [line for line in body.decode().split("\n\n") if line]
    assert status == 200 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_stop_sequences_cut_the_answer(chat):
    full = chat.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30,
                                        temperature=1, seed=3).choices[0].message.content
    # The random model's greedy answer is empty (it ends the turn at once); a seeded sample is
    # long and reproducible.
    assert len(full) >= 6, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = chat.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30,
                                       temperature=1, seed=3, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == full[:full.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = chat.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30,
                                            temperature=1, seed=3, stop=stop, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text.strip() == cut.choices[0].message.content


def test_chat_request_errors(chat):
    with pytest.raises(openai.NotFoundError) as info:
        chat.chat.completions.create(model="nope", messages=HELLO)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        chat.chat.completions.create(model="tiny", messages=HELLO, n=2)
    with pytest.raises(openai.BadRequestError):
        chat.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError):
        chat.chat.completions.create(model="tiny", messages=HELLO, temperature=5)


def test_models_list_retrieve_delete_with_colons_and_slashes(client, server, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(20))
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=file.id, model="tiny", hyperparameters={"n_epochs": 1}).id)
    name = job.fine_tuned_model
    assert name in [m.id for m in client.models.list()]
    assert client.models.retrieve(name).owned_by == "afinar"
    # Percent-encoded ':' and '/' route to the same model.
    quoted = urllib.parse.quote(name, safe="")
    status, body = raw("GET", f"{server.url}/models/{quoted}")
    assert status == 200 and json.loads(body)["id"] == name
    assert client.models.retrieve("tiny").id == "tiny"
    status, body = raw("GET", f"{server.url}/models/org%2Fno-such-model")
    assert status == 404 and "org/no-such-model" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete("tiny")
    assert client.models.delete(name).deleted
    assert name not in [m.id for m in client.models.list()]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=HELLO)


def test_api_keys_are_required_when_configured(tmp_path, tiny_model_dir):
    srv = make_server(tmp_path / "keys", tiny_model_dir, api_keys=["sk-config"]).start(
        env={"AFINAR_API_KEYS": "sk-env-1,sk-env-2"})
    try:
        for key in ("sk-config", "sk-env-2"):
            assert [m.id for m in srv.client().with_options(api_key=key).models.list()]
        with pytest.raises(openai.AuthenticationError) as info:
            srv.client().with_options(api_key="sk-wrong").models.list()
        assert info.value.body["code"] == "invalid_api_key"
        status, body = raw("GET", srv.url + "/models")
        assert status == 401 and json.loads(body)["error"]["code"] == "missing_api_key"
    finally:
        srv.stop()


def test_concurrent_chats_while_a_job_trains(client, tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(40))
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=file.id, model="tiny",
                                         hyperparameters={"n_epochs": 6})
    wait_for(client, job.id, statuses=("running",))
    answers, errors = [], []

    def ask(i: int) -> None:
        try:
            answers.append(client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"pedido {i}"}],
                max_tokens=5, temperature=0))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(answers) == 8
    # The training went on meanwhile (it runs in the worker process).
    assert client.fine_tuning.jobs.retrieve(job.id).status in ("running", "succeeded")
    client.fine_tuning.jobs.cancel(job.id)
    assert wait_for(client, job.id).status in ("cancelled", "succeeded")


def test_without_keys_the_server_stays_on_loopback(tmp_path, tiny_model_dir):
    srv = make_server(tmp_path / "open", tiny_model_dir).start(args=("--host", "0.0.0.0"))
    try:
        log = " ".join((srv.folder / "server.log").read_text().split())
        assert "listening on 127.0.0.1 only" in log
        assert [m.id for m in srv.client().models.list()]  # reachable on 127.0.0.1
    finally:
        srv.stop()
