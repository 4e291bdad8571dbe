"""The server's state on both databases it supports: SQLite (the default, a real file) and
PostgreSQL (a real server started by tests/postgres.py). Same store, same answers; leases and
claims as workers on several machines use them; an SQLite state folder from before Alembic
upgrades in place."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from afinar.serve.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    store = Store(tmp_path / "state", url)
    yield store
    store.close()


def _job(store: Store, job_id: str, project: str = "default", status: str = "queued") -> None:
    store.add_job({"id": job_id, "model": "tiny", "base_spec": "tiny", "status": status,
                   "training_file": "file-x", "result_files": [], "project": project,
                   "run_dir": str(store.folder / "runs" / job_id), "metadata": {"k": "v"}})


def test_objects_belong_to_their_project(store):
    store.add_file("file-a", "a.jsonl", 10, "fine-tune", project="team-a")
    store.add_file("file-b", "b.jsonl", 20, "fine-tune", project="team-b")
    _job(store, "ftjob-a", "team-a")
    store.update_job("ftjob-a", fine_tuned_model="ft:tiny:afinar::a", status="succeeded")
    assert store.file("file-a", "team-b") is None and store.file("file-a", "team-a")["bytes"] == 10
    assert [f["id"] for f in store.files(project="team-b")] == ["file-b"]
    assert {f["id"] for f in store.files(project=None)} == {"file-a", "file-b"}  # the admin
    assert store.job("ftjob-a", "team-b") is None
    assert store.jobs(project="team-b") == [] and store.jobs(project="team-a")[0]["id"] == "ftjob-a"
    assert store.job_by_model("ft:tiny:afinar::a", "team-b") is None
    assert store.job_by_model("ft:tiny:afinar::a", "team-a")["metadata"] == {"k": "v"}
    assert store.fine_tuned_jobs("team-b") == []
    assert store.usage("team-a") == (1, 10)
    store.add_rating({"messages": [], "model_a": "x", "model_b": "y", "verdict": "a"}, "team-a")
    assert store.ratings(project="team-b") == [] and len(store.ratings(project="team-a")) == 1


def test_events_page_in_order(store):
    _job(store, "ftjob-e")
    for i in range(5):
        store.add_event("ftjob-e", f"event {i}")
    newest = store.events("ftjob-e", limit=2)
    assert [e["message"] for e in newest] == ["event 4", "event 3"]
    assert [e["message"] for e in store.events("ftjob-e", after=newest[-1]["id"], limit=10)] \
        == ["event 2", "event 1", "event 0"]
    assert [e["message"] for e in store.events_since("ftjob-e", newest[-1]["id"])] == ["event 4"]


def test_a_claim_is_leased_renewed_and_taken_over_when_it_expires(store):
    _job(store, "ftjob-1")
    _job(store, "ftjob-2")
    job, before = store.claim_job("w1", lease_seconds=0.5)
    assert job["id"] == "ftjob-1" and job["worker"] == "w1" and job["attempts"] == 1
    assert before["status"] == "queued"
    assert store.claim_job("w2", 30)[0]["id"] == "ftjob-2"  # not w1's job
    assert store.claim_job("w3", 30) is None
    assert store.renew_lease("ftjob-1", "w1", 0.5) and not store.renew_lease("ftjob-1", "w2", 5)
    time.sleep(0.7)  # w1 stopped renewing: its job is anyone's now, one attempt more
    job, before = store.claim_job("w3", 30)
    assert (job["id"], job["worker"], job["attempts"]) == ("ftjob-1", "w3", 2)
    assert before["status"] == "running" and before["worker"] == "w1"
    # w1 comes back: it cannot renew, and its writes to the job change nothing.
    assert not store.renew_lease("ftjob-1", "w1", 30)
    assert not store.update_job("ftjob-1", worker="w1", status="succeeded")
    assert store.job("ftjob-1")["status"] == "running"


def test_a_crashed_attempt_waits_before_the_next_one_and_the_wait_doubles(store):
    # A full disk failed all three attempts of a job within seconds (bench_team.py, fault e):
    # each retry now waits retry_seconds, doubled per attempt, before a worker claims it.
    from afinar.serve.job_run import retry_or_fail
    from afinar.serve.settings import ServeSettings

    settings = ServeSettings(retry_seconds=1, max_attempts=3)
    _job(store, "ftjob-r")
    job, _ = store.claim_job("w1", 30)
    retry_or_fail(store, settings, job, "OSError: No space left on device", {"worker": "w1"})
    row = store.job("ftjob-r")
    assert row["status"] == "queued" and row["resume"] == 1
    assert "Attempt 1 of 3 failed: OSError: No space left on device; the job is queued again " \
        "and starts again in 1 s at the earliest" == store.events("ftjob-r", limit=1)[0]["message"]
    _job(store, "ftjob-later")  # a younger job is not held up by the waiting one
    assert store.claim_job("w2", 30)[0]["id"] == "ftjob-later"
    assert store.claim_job("w2", 30) is None
    time.sleep(1.1)
    job, _ = store.claim_job("w2", 30)
    assert (job["id"], job["attempts"]) == ("ftjob-r", 2)
    started = time.time()
    retry_or_fail(store, settings, job, "OSError: again", {"worker": "w2"})
    assert 1.9 < store.job("ftjob-r")["lease_until"] - started <= 2.1  # doubled
    # The last attempt's failure fails the job at once.
    store.update_job("ftjob-r", lease_until=None)  # its wait over
    job, _ = store.claim_job("w3", 30)
    assert job["attempts"] == 3
    retry_or_fail(store, settings, job, "OSError: still", {"worker": "w3"})
    row = store.job("ftjob-r")
    assert row["status"] == "failed" and "OSError: still" in row["error"]["message"]


def test_concurrent_workers_claim_each_job_once(store):
    for i in range(12):
        _job(store, f"ftjob-{i:02d}")
    claimed: list[str] = []

    def worker(name: str) -> None:
        mine = Store(store.folder, store.db.url)
        while (got := mine.claim_job(name, 60)) is not None:
            claimed.append(got[0]["id"])
        mine.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(claimed) == [f"ftjob-{i:02d}" for i in range(12)]


def test_postgres_claims_skip_a_locked_job_instead_of_waiting(postgres_url, tmp_path):
    store = Store(tmp_path / "state", postgres_url)
    _job(store, "ftjob-locked")
    _job(store, "ftjob-free")
    engine = sa.create_engine(postgres_url)
    with engine.begin() as other:  # another worker's transaction holds the first job's row
        other.execute(sa.text("SELECT id FROM jobs WHERE id = 'ftjob-locked' FOR UPDATE"))
        started = time.monotonic()
        job, _ = store.claim_job("w1", 60)
        assert job["id"] == "ftjob-free" and time.monotonic() - started < 5
    engine.dispose()
    store.close()


# The schema afinar 0.1 wrote by hand (serve/store.py before Alembic), with one job in it.
_BEFORE_ALEMBIC = [
    """CREATE TABLE files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
        filename TEXT, bytes INTEGER, purpose TEXT, created_at INTEGER, status TEXT,
        status_details TEXT, deleted INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
        created_at INTEGER, model TEXT, base_spec TEXT, training_file TEXT,
        validation_file TEXT, hyperparameters TEXT, method TEXT, suffix TEXT, seed INTEGER,
        metadata TEXT, status TEXT, error TEXT, fine_tuned_model TEXT, model_name TEXT,
        finished_at INTEGER, trained_tokens INTEGER, estimated_finish INTEGER,
        result_files TEXT DEFAULT '[]', run_dir TEXT, requested TEXT,
        resume INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER,
        model_deleted INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
        job_id TEXT, created_at INTEGER, level TEXT, message TEXT, type TEXT, data TEXT)""",
    "CREATE INDEX events_by_job ON events(job_id, seq)",
    """CREATE TABLE checkpoints (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
        job_id TEXT, created_at INTEGER, step_number INTEGER, metrics TEXT,
        model_name TEXT UNIQUE, path TEXT)""",
    """CREATE TABLE ratings (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
        created_at INTEGER, messages TEXT, model_a TEXT, model_b TEXT, answer_a TEXT,
        answer_b TEXT, "left" TEXT, verdict TEXT, ideal TEXT, source TEXT)""",
    """INSERT INTO jobs (id, status, model, fine_tuned_model, result_files, metadata)
        VALUES ('ftjob-old', 'succeeded', 'tiny', 'ft:tiny:afinar::old', '[]', '{"a": 1}')""",
    """INSERT INTO files (id, filename, bytes, purpose) VALUES ('file-old', 'x.jsonl', 3,
        'fine-tune')""",
]


def test_a_state_from_before_alembic_upgrades_in_place(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    db = sqlite3.connect(state / "serve.db")
    for statement in _BEFORE_ALEMBIC:
        db.execute(statement)
    db.commit()
    db.close()

    store = Store(state)
    job = store.job("ftjob-old")
    assert job["project"] == "default" and job["settings"] is None and job["attempts"] == 0
    assert job["metadata"] == {"a": 1}
    assert store.file("file-old", "default")["filename"] == "x.jsonl"
    assert store.job_by_model("ft:tiny:afinar::old", "default")["id"] == "ftjob-old"
    _job(store, "ftjob-new")  # and it takes new rows with the new columns
    assert store.claim_job("w1", 60)[0]["id"] == "ftjob-new"
    store.close()
    with sqlite3.connect(state / "serve.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0002",)]
    Store(state).close()  # opening again migrates nothing and keeps everything
    assert Store(state).job("ftjob-old")["fine_tuned_model"] == "ft:tiny:afinar::old"


def test_a_bad_database_url_is_a_clear_error(tmp_path):
    from afinar.errors import AfinarError

    with pytest.raises(AfinarError, match="invalid database URL"):
        Store(tmp_path / "state", "not a url")


def test_a_postgres_restart_costs_a_reconnect_not_an_error(tmp_path):
    from postgres import LocalPostgres

    server = LocalPostgres().start(tmp_path / "pg")
    try:
        store = Store(tmp_path / "state", server.url)
        _job(store, "ftjob-r")
        server.restart()  # every pooled connection is dead now
        store.add_event("ftjob-r", "after the restart")
        assert store.events("ftjob-r")[0]["message"] == "after the restart"
        server.kill()  # gone for a moment: the call waits for it instead of failing
        threading.Timer(2.0, lambda: server.start(tmp_path / "pg")).start()
        assert store.claim_job("w1", 60)[0]["id"] == "ftjob-r"
        store.close()
    finally:
        server.stop()


def test_a_worker_that_lost_its_job_adds_nothing_to_it(store):
    _job(store, "ftjob-s")
    store.claim_job("w-old", lease_seconds=0.1)
    time.sleep(0.2)
    store.claim_job("w-new", 60)  # took over
    assert not store.add_event("ftjob-s", "Step 51/160 from the old worker", worker="w-old")
    store.add_checkpoint("ftjob-s", 50, {}, "ft:x:ckpt-step-50", str(store.folder), worker="w-old")
    assert store.add_event("ftjob-s", "Step 41/160", worker="w-new")
    assert [e["message"] for e in store.events("ftjob-s")] == ["Step 41/160"]
    assert store.checkpoints("ftjob-s") == []
