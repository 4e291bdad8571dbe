"""Where the server's state lives: SQLite in the state folder (the default) or PostgreSQL.

    AFINAR_DATABASE_URL=postgresql+psycopg://user:pass@host/db  afinar serve ...
    database_url: postgresql+psycopg://...                      # or in serve.yaml

One code path for both through SQLAlchemy Core. The schema is kept by Alembic's migrations
(serve/migrations/): every process that opens the database upgrades it to the newest revision
first, under a lock (an SQLite write lock / a PostgreSQL advisory lock), so the API and workers
starting together migrate once; a state folder from a release before Alembic upgrades in place.

SQLite: every write transaction is BEGIN IMMEDIATE (writers queue instead of failing half-way),
WAL so readers never wait for them. PostgreSQL: connections are checked before use, so a
restarted server costs a reconnect, not an error.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

from afinar.errors import AfinarError

ENV = "AFINAR_DATABASE_URL"
# Any constant: the key of the advisory lock PostgreSQL holds while one process migrates.
_MIGRATION_LOCK = 0x61666E72
# A database that goes away (PostgreSQL restarted, a network blip) is retried this long before
# the request fails.
RETRY_SECONDS = 30.0


def database_url(configured: str | None, state_dir: Path) -> str:
    url = os.environ.get(ENV) or configured
    if url:
        return url
    return f"sqlite:///{Path(state_dir) / 'serve.db'}"


def describe(url: str) -> str:
    """The URL without its password, for logs and errors."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparseable database URL)"


class Database:
    """Engines for one database: `write()` opens a transaction that serialises with other
    writers, `read()` one that never blocks them."""

    def __init__(self, url: str):
        self.url = url
        try:
            parsed = sa.engine.make_url(url)
        except Exception as exc:
            raise AfinarError(f"invalid database URL {url!r}: {exc}",
                              hint="e.g. postgresql+psycopg://user:password@host:5432/afinar, "
                              f"in {ENV} or database_url") from None
        self.sqlite = parsed.get_backend_name() == "sqlite"
        if self.sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            self.writer = self._sqlite_engine(url, "BEGIN IMMEDIATE")
            self.reader = self._sqlite_engine(url, "BEGIN")
        else:
            for plain in ("postgresql://", "postgres://"):  # the driver afinar installs
                if url.startswith(plain):
                    url = "postgresql+psycopg://" + url[len(plain):]
            try:
                self.writer = sa.create_engine(url, pool_pre_ping=True, pool_size=10,
                                               max_overflow=20, pool_recycle=1800)
            except ModuleNotFoundError as exc:
                raise AfinarError(f"the database driver is not installed ({exc.name})",
                                  hint="afinar's state is in SQLite or PostgreSQL; for "
                                  "PostgreSQL: pip install 'afinar[postgres]' (psycopg)") from None
            self.reader = self.writer

    def describe(self) -> str:
        return describe(self.url)

    @staticmethod
    def _sqlite_engine(url: str, begin: str) -> Engine:
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we say BEGIN ourselves, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection):
            connection.exec_driver_sql(begin)

        return engine

    @contextmanager
    def write(self):
        with self.writer.begin() as connection:
            yield connection

    @contextmanager
    def read(self):
        with self.reader.connect() as connection:
            yield connection

    def retrying(self, work):
        """Runs `work()` again while the database cannot be reached (a PostgreSQL restart), up
        to RETRY_SECONDS; other errors are raised at once."""
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                return work()
            except sa.exc.OperationalError as exc:
                if self.sqlite and "locked" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise AfinarError(f"the database {describe(self.url)} cannot be reached: "
                                      f"{str(exc.orig).strip().splitlines()[0]}",
                                      hint="is the database server running?") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def migrate(self) -> None:
        """Upgrades the schema to the newest migration (nothing when it is there already)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))

        def upgrade():
            with self.write() as connection:
                if not self.sqlite:
                    connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"),
                                       {"key": _MIGRATION_LOCK})
                config.attributes["connection"] = connection
                command.upgrade(config, "head")

        self.retrying(upgrade)

    def close(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()
