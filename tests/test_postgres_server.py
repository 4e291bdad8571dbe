"""The throwaway PostgreSQL server of tests/postgres.py (scripts/postgres.sh) answers through
SQLAlchemy with psycopg, keeps its data across a restart and a crash, and gives each test its own
database."""

from __future__ import annotations

import uuid

import sqlalchemy as sa


def test_answers_select_1(postgres_url):
    assert postgres_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    engine = sa.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    engine.dispose()


def _write_then_read(postgres_server, postgres_url, interrupt) -> list:
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE kept (id int PRIMARY KEY, name text)"))
        conn.execute(sa.text("INSERT INTO kept VALUES (1, 'uno'), (2, 'dos')"))
    engine.dispose()
    port = postgres_server.port
    interrupt()
    postgres_server.restart()
    assert postgres_server.port == port
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, name FROM kept ORDER BY id")).all()
    engine.dispose()
    return [tuple(row) for row in rows]


def test_restart_keeps_data(postgres_server, postgres_url):
    assert _write_then_read(postgres_server, postgres_url, lambda: None) == [(1, "uno"),
                                                                             (2, "dos")]


def test_kill_then_restart_recovers_committed_data(postgres_server, postgres_url):
    assert _write_then_read(postgres_server, postgres_url, postgres_server.kill) == [(1, "uno"),
                                                                                     (2, "dos")]


def test_each_test_database_is_distinct(postgres_server, postgres_url):
    name = f"other_{uuid.uuid4().hex[:8]}"
    other = postgres_server.create_database(name)
    assert other != postgres_url
    first, second = sa.create_engine(postgres_url), sa.create_engine(other)
    with first.begin() as conn:
        conn.execute(sa.text("CREATE TABLE only_here (x int)"))
    with second.connect() as conn:
        assert conn.execute(sa.text("SELECT current_database()")).scalar_one() == name
        assert conn.execute(sa.text("SELECT to_regclass('only_here')")).scalar_one() is None
    first.dispose()
    second.dispose()
