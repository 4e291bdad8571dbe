"""/v1/files with the real openai client: upload, list, retrieve, content, delete, errors.
Files are the web process's alone, so these run in-process (serving.in_process): the same app as
`afinar serve`, through FastAPI's test client."""

from __future__ import annotations

import io
import json

import openai
import pytest

from conftest import write_jsonl
from serving import chat_records


@pytest.fixture
def client(in_process):
    return in_process.client()


def test_upload_list_retrieve_content_delete(client, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", chat_records(12))
    uploaded = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert uploaded.bytes == data.stat().st_size and uploaded.filename == "train.jsonl"
    assert uploaded.purpose == "fine-tune" and uploaded.status == "processed"
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert uploaded.id in [f.id for f in client.files.list()]
    assert uploaded.id in [f.id for f in client.files.list(purpose="fine-tune")]
    assert client.files.content(uploaded.id).read() == data.read_bytes()
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError) as info:
        client.files.retrieve(uploaded.id)
    assert info.value.status_code == 404 and info.value.body["code"] == "file_not_found"


def test_client_file_names_never_become_paths(client, in_process):
    evil = ("../../../../tmp/evil.jsonl", io.BytesIO(b'{"text": "x"}\n'))
    uploaded = client.files.create(file=evil, purpose="fine-tune")
    assert uploaded.filename == "evil.jsonl"
    stored = in_process.folder / "state" / "files" / uploaded.id
    assert stored.read_bytes() == b'{"text": "x"}\n'


def test_upload_over_the_limit_is_413_and_leaves_nothing(client, in_process):
    before = sorted(p.name for p in (in_process.folder / "state" / "files").iterdir())
    big = io.BytesIO(b'{"text": "' + b"x" * 80_000 + b'"}\n')  # limit: 0.05 MB
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", big), purpose="fine-tune")
    assert info.value.status_code == 413
    assert "too large" in info.value.body["message"]
    # Far over the limit: refused from its Content-Length, before the body is read.
    huge = io.BytesIO(b'{"text": "' + b"x" * 400_000 + b'"}\n')
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("huge.jsonl", huge), purpose="fine-tune")
    assert info.value.status_code == 413 and info.value.body["code"] == "file_too_large"
    assert sorted(p.name for p in (in_process.folder / "state" / "files").iterdir()) == before


def test_bad_purpose_and_missing_fields_are_400(client, in_process):
    with pytest.raises(openai.BadRequestError) as info:
        client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="banana")
    assert info.value.body["param"] == "purpose"
    # A request without the file part: 400 in OpenAI's envelope (not FastAPI's 422).
    status, body = in_process.raw("POST", "/files", b"purpose=fine-tune",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
