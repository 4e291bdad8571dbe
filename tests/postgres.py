"""A real, throwaway PostgreSQL server for tests and benchmarks, started with
scripts/postgres.sh (Debian's binaries, 127.0.0.1 only, trust auth; scripts/install_postgres.sh
installs them).

Tests use the fixtures (tests/conftest.py registers this module as a plugin): `postgres_server`,
one LocalPostgres per session, and `postgres_url`, the SQLAlchemy URL of a fresh database per
test. Bench scripts put tests/ on sys.path and drive it themselves:

    server = LocalPostgres().start(folder)
    url = server.create_database("bench")   # postgresql+psycopg://postgres@127.0.0.1:PORT/bench
    ...
    server.stop()

When the server cannot start the fixture fails with the log's tail: never a skip.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres.sh"


class LocalPostgres:
    """One server in `folder` (data/, socket/, port, postgres.log), user `postgres`, no password."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.url = ""

    def _script(self, *args: str) -> str:
        done = subprocess.run(["bash", str(SCRIPT), *args, str(self.folder)], capture_output=True,
                              text=True, timeout=180)
        if done.returncode:
            raise RuntimeError(f"postgres.sh {args[0]} {self.folder} failed:\n"
                               f"{done.stderr.strip()}")
        return done.stdout.strip()

    def start(self, folder: str | Path) -> "LocalPostgres":
        self.folder = Path(folder)
        self.url = self._script("start")
        return self

    def stop(self) -> None:
        self._script("stop")

    def restart(self) -> None:
        """Same data, same port."""
        self.url = self._script("restart")

    @property
    def port(self) -> int:
        return int((self.folder / "port").read_text())

    def kill(self, timeout: float = 30) -> None:
        """SIGKILL the postmaster (a crash, for fault tests) and wait until every server process
        is gone; `restart()` then recovers from the WAL."""
        pid = int((self.folder / "data" / "postmaster.pid").read_text().split()[0])
        family = [pid, *_children(pid)]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(map(_alive, family)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres processes {family} outlived SIGKILL by {timeout}s")
            time.sleep(0.05)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                             dbname="postgres", autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (a killed server waits for PID 1 to reap it) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """One LocalPostgres for the whole session, stopped at its end."""
    server, error = LocalPostgres(), None
    try:
        server.start(tmp_path_factory.mktemp("postgres"))
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        error = err
    if error:
        pytest.fail(f"could not start PostgreSQL: {error}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """The SQLAlchemy URL of a new database, named after the test, on the session's server."""
    stem = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")[:40]
    return postgres_server.create_database(f"{stem}_{uuid.uuid4().hex[:8]}")
