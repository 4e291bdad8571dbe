"""The server's tables as SQLAlchemy Core objects: the schema at the newest migration
(serve/migrations/versions/). The store queries through these; the migrations create and alter
the real tables, so a change here goes with a new migration.

JSON values are stored as text (encoded by the store) so SQLite and PostgreSQL hold the same
bytes; `seq` orders rows as they were written (ids are random).
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, MetaData, Table, Text

metadata = MetaData()


def _seq() -> Column:
    return Column("seq", Integer, primary_key=True, autoincrement=True)


def _project() -> Column:
    # Every object belongs to one project; a key sees its project's objects only.
    return Column("project", Text, nullable=False, server_default="default")


files = Table(
    "files", metadata, _seq(),
    Column("id", Text, unique=True, nullable=False), Column("filename", Text),
    Column("bytes", Integer), Column("purpose", Text), Column("created_at", Integer),
    Column("status", Text), Column("status_details", Text),
    Column("deleted", Integer, nullable=False, server_default="0"), _project(),
    sqlite_autoincrement=True)

jobs = Table(
    "jobs", metadata, _seq(),
    Column("id", Text, unique=True, nullable=False), Column("created_at", Integer),
    Column("model", Text), Column("base_spec", Text), Column("training_file", Text),
    Column("validation_file", Text), Column("hyperparameters", Text), Column("method", Text),
    Column("suffix", Text), Column("seed", Integer), Column("metadata", Text),
    Column("status", Text), Column("error", Text), Column("fine_tuned_model", Text),
    Column("model_name", Text), Column("finished_at", Integer), Column("trained_tokens", Integer),
    Column("estimated_finish", Integer), Column("result_files", Text, server_default="[]"),
    Column("run_dir", Text), Column("requested", Text),
    Column("resume", Integer, nullable=False, server_default="0"),
    Column("worker_pid", Integer),
    Column("model_deleted", Integer, nullable=False, server_default="0"),
    Column("settings", Text), _project(),
    # The lease: the worker that trains the job ("host:pid:random") and until when (epoch
    # seconds) it holds it; an expired lease lets another worker take the job over.
    Column("worker", Text), Column("lease_until", Float),
    Column("attempts", Integer, nullable=False, server_default="0"),
    sqlite_autoincrement=True)

events = Table(
    "events", metadata, _seq(),
    Column("id", Text, unique=True, nullable=False), Column("job_id", Text),
    Column("created_at", Integer), Column("level", Text), Column("message", Text),
    Column("type", Text), Column("data", Text),
    sqlite_autoincrement=True)
Index("events_by_job", events.c.job_id, events.c.seq)

checkpoints = Table(
    "checkpoints", metadata, _seq(),
    Column("id", Text, unique=True, nullable=False), Column("job_id", Text),
    Column("created_at", Integer), Column("step_number", Integer), Column("metrics", Text),
    Column("model_name", Text, unique=True), Column("path", Text),
    sqlite_autoincrement=True)

# Blind A/B votes of the dashboard's Rate page; "left" is the model ("a" or "b") whose answer
# was shown first, kept to study position bias.
ratings = Table(
    "ratings", metadata, _seq(),
    Column("id", Text, unique=True, nullable=False), Column("created_at", Integer),
    Column("messages", Text), Column("model_a", Text), Column("model_b", Text),
    Column("answer_a", Text), Column("answer_b", Text), Column("left", Text),
    Column("verdict", Text), Column("ideal", Text), Column("source", Text), _project(),
    sqlite_autoincrement=True)

JSON_COLUMNS = {"hyperparameters", "method", "metadata", "error", "result_files", "metrics",
                "data", "messages", "settings"}
