"""Keys belong to projects: a project's files, jobs, models, events, ratings and registry
versions are invisible to another project's key (a 404, as OpenAI answers for an id you may not
see), the admin key sees them all, and uploads are limited per project. In-process app (no
workers), the real `openai` client."""

from __future__ import annotations

import io

import openai
import pytest

from conftest import write_jsonl
from serving import InProcess, chat_records, make_server

KEYS = {"team-a": "sk-team-a", "team-b": "sk-team-b"}
ADMIN = "sk-admin"


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from fastapi.testclient import TestClient

    from afinar.serve.app import create_app
    from afinar.serve.settings import load_serve_settings

    folder = tmp_path_factory.mktemp("projects")
    config = make_server(folder, tiny_model_dir, admin_keys=[ADMIN], projects={
        "team-a": {"keys": [KEYS["team-a"]], "max_files": 3},
        "team-b": {"keys": [KEYS["team-b"]], "max_storage_mb": 0.01}}).config
    with TestClient(create_app(load_serve_settings(config), str(config), workers=False)) as http:
        yield InProcess(folder, http)


def _client(app: InProcess, key: str, **kw):
    return openai.OpenAI(base_url=app.url, api_key=key, max_retries=0, http_client=app.http,
                         **kw)


def test_another_projects_objects_are_404(app, tmp_path):
    a, b = _client(app, KEYS["team-a"]), _client(app, KEYS["team-b"])
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(12))
    file = a.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = a.fine_tuning.jobs.create(training_file=file.id, model="tiny")
    store = app.http.app.state.store
    store.update_job(job.id, status="succeeded", fine_tuned_model="ft:tiny:afinar::x")

    assert file.id in [f.id for f in a.files.list()]
    assert file.id not in [f.id for f in b.files.list()]
    assert job.id not in [j.id for j in b.fine_tuning.jobs.list()]
    assert "ft:tiny:afinar::x" not in [m.id for m in b.models.list()]
    assert "ft:tiny:afinar::x" in [m.id for m in a.models.list()]
    for attempt in (lambda: b.files.retrieve(file.id), lambda: b.files.content(file.id),
                    lambda: b.files.delete(file.id),
                    lambda: b.fine_tuning.jobs.retrieve(job.id),
                    lambda: b.fine_tuning.jobs.cancel(job.id),
                    lambda: b.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id),
                    lambda: b.fine_tuning.jobs.checkpoints.list(job.id),
                    lambda: b.models.retrieve("ft:tiny:afinar::x"),
                    lambda: b.models.delete("ft:tiny:afinar::x"),
                    lambda: b.chat.completions.create(model="ft:tiny:afinar::x", messages=[
                        {"role": "user", "content": "hola"}], max_tokens=2)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    # Training on another project's file or from its fine-tune: as if they did not exist.
    with pytest.raises(openai.BadRequestError, match="no file with id"):
        b.fine_tuning.jobs.create(training_file=file.id, model="tiny")
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        b.fine_tuning.jobs.create(training_file=file.id, model="ft:tiny:afinar::x")
    # Nothing of team-a's changed, and the admin key sees both projects.
    assert a.files.retrieve(file.id).id == file.id
    admin = _client(app, ADMIN)
    assert job.id in [j.id for j in admin.fine_tuning.jobs.list()]
    as_b = _client(app, ADMIN, project="team-b")  # the SDK's OpenAI-Project header
    assert job.id not in [j.id for j in as_b.fine_tuning.jobs.list()]
    with pytest.raises(openai.AuthenticationError, match="does not match"):
        _client(app, KEYS["team-b"], project="team-a").files.list()


def test_uploads_are_limited_per_project_and_names_are_never_paths(app):
    a, b = _client(app, KEYS["team-a"]), _client(app, KEYS["team-b"])
    before = len(a.files.list().data)
    names = ["../../etc/passwd", "a/b/c.jsonl", "..\\x.jsonl"]
    stored = []
    for name in names[:3 - before]:
        row = a.files.create(file=(name, io.BytesIO(b"{}\n")), purpose="fine-tune")
        stored.append(row.filename)
        assert (app.folder / "state" / "files" / row.id).is_file()
    assert all("/" not in s and "\\" not in s and ".." != s for s in stored), stored
    with pytest.raises(openai.RateLimitError, match="max_files"):
        a.files.create(file=("one-more.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    # team-b may hold 0.01 MB: a 20 KB file does not fit, and nothing of it is kept.
    with pytest.raises(openai.APIStatusError, match="space project 'team-b' has left") as err:
        b.files.create(file=("big.jsonl", io.BytesIO(b"x" * 20_000)), purpose="fine-tune")
    assert err.value.status_code == 413
    assert b.files.list().data == []
    assert not [p for p in (app.folder / "state" / "files").iterdir() if p.name.startswith(".")]


def test_a_wrong_key_is_401_on_every_route(app):
    for path in ("/files", "/fine_tuning/jobs", "/models", "/registry/versions", "/ratings"):
        status, _ = app.raw("GET", path, headers={"Authorization": "Bearer sk-wrong"})
        assert status == 401, path
