"""The server's state in SQLite (STATE/serve.db) with uploaded files beside it (STATE/files/).

The web process and the worker processes share it; every write is one BEGIN IMMEDIATE
transaction, so they never see each other's half-done changes. Files are stored under their
generated id: a client's file name is only ever data, never a path.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from pathlib import Path

from afinar.serve.ids import new_id, now

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS files (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT,
        bytes INTEGER, purpose TEXT, created_at INTEGER, status TEXT, status_details TEXT,
        deleted INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS jobs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER,
        model TEXT, base_spec TEXT, training_file TEXT, validation_file TEXT,
        hyperparameters TEXT, method TEXT, suffix TEXT, seed INTEGER, metadata TEXT,
        status TEXT, error TEXT, fine_tuned_model TEXT, model_name TEXT, finished_at INTEGER,
        trained_tokens INTEGER, estimated_finish INTEGER, result_files TEXT DEFAULT '[]',
        run_dir TEXT, requested TEXT, resume INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER,
        model_deleted INTEGER NOT NULL DEFAULT 0, settings TEXT)""",
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT,
        created_at INTEGER, level TEXT, message TEXT, type TEXT, data TEXT)""",
    "CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, seq)",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, job_id TEXT,
        created_at INTEGER, step_number INTEGER, metrics TEXT, model_name TEXT UNIQUE,
        path TEXT)""",
    # Blind A/B votes of the dashboard's Rate page; "left" is the model ("a" or "b") whose
    # answer was shown first, kept to study position bias.
    """CREATE TABLE IF NOT EXISTS ratings (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, created_at INTEGER,
        messages TEXT, model_a TEXT, model_b TEXT, answer_a TEXT, answer_b TEXT,
        "left" TEXT, verdict TEXT, ideal TEXT, source TEXT)""",
]
_JSON_COLUMNS = {"hyperparameters", "method", "metadata", "error", "result_files", "metrics",
                 "data", "messages", "settings"}
# Columns added after a release: a database created before gets them on open.
_ADDED_COLUMNS = [("jobs", "settings", "TEXT")]


def _decode(row: sqlite3.Row | None) -> dict | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


def _encode(values: dict) -> dict:
    return {k: json.dumps(v) if k in _JSON_COLUMNS and v is not None else v
            for k, v in values.items()}


class Store:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files_dir = self.folder / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.folder / "serve.db"
        with self._write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            for table, column, kind in _ADDED_COLUMNS:
                have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    # --- plumbing ---------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        return db

    @contextmanager
    def _write(self):
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def _query(self, sql: str, args=()) -> list[dict]:
        db = self._connect()
        try:
            return [_decode(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    def _one(self, sql: str, args=()) -> dict | None:
        rows = self._query(sql, args)
        return rows[0] if rows else None

    # --- files ------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, file_id: str, filename: str, size: int, purpose: str,
                 status: str = "processed") -> dict:
        with self._write() as db:
            db.execute("INSERT INTO files (id, filename, bytes, purpose, created_at, status) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (file_id, filename, size, purpose, now(),
                                                    status))
        return self.file(file_id)

    def file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM files WHERE id = ? AND deleted = 0", (file_id,))

    def files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
              order: str = "desc") -> list[dict]:
        sql, args = "SELECT * FROM files WHERE deleted = 0", []
        if purpose:
            sql, args = sql + " AND purpose = ?", args + [purpose]
        if after:
            cursor = self._one("SELECT seq FROM files WHERE id = ?", (after,))
            if cursor:
                sql += " AND seq < ?" if order == "desc" else " AND seq > ?"
                args.append(cursor["seq"])
        sql += f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
        return self._query(sql, args + [limit])

    def delete_file(self, file_id: str) -> bool:
        with self._write() as db:
            changed = db.execute("UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0",
                                 (file_id,)).rowcount
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(changed)

    # --- jobs -------------------------------------------------------------------------------
    def add_job(self, values: dict) -> dict:
        values = _encode({**values, "created_at": now()})
        with self._write() as db:
            db.execute(f"INSERT INTO jobs ({', '.join(values)}) VALUES "
                       f"({', '.join('?' for _ in values)})", list(values.values()))
        return self.job(values["id"])

    def job(self, job_id: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def jobs(self, after: str | None = None, limit: int = 20,
             metadata: dict | None = None) -> list[dict]:
        """Newest first; `after` is the id of the last job of the previous page."""
        sql, args = "SELECT * FROM jobs", []
        if after:
            cursor = self._one("SELECT seq FROM jobs WHERE id = ?", (after,))
            sql, args = sql + " WHERE seq < ?", [cursor["seq"] if cursor else -1]
        rows = self._query(sql + " ORDER BY seq DESC", args)
        if metadata:
            rows = [r for r in rows if all((r["metadata"] or {}).get(k) == v
                                           for k, v in metadata.items())]
        return rows[:limit]

    def update_job(self, job_id: str, when_status: tuple[str, ...] | None = None,
                   **values) -> bool:
        """Sets `values`; with `when_status`, only if the job is in one of those statuses (so a
        cancel never overwrites a job that has just finished). True when it changed."""
        values = _encode(values)
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?"
        args = list(values.values()) + [job_id]
        if when_status:
            sql += f" AND status IN ({', '.join('?' for _ in when_status)})"
            args += list(when_status)
        with self._write() as db:
            return db.execute(sql, args).rowcount > 0

    def claim_job(self, pid: int) -> dict | None:
        """Atomically takes the oldest queued job for worker `pid`."""
        with self._write() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1"
                             ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', worker_pid = ? WHERE id = ?",
                       (pid, row["id"]))
        return self.job(row["id"])

    def jobs_in(self, *statuses: str) -> list[dict]:
        return self._query(f"SELECT * FROM jobs WHERE status IN "
                           f"({', '.join('?' for _ in statuses)}) ORDER BY seq", statuses)

    def job_by_model(self, name: str) -> dict | None:
        return self._one("SELECT * FROM jobs WHERE fine_tuned_model = ? AND model_deleted = 0",
                         (name,))

    def fine_tuned_jobs(self) -> list[dict]:
        return self._query("SELECT * FROM jobs WHERE fine_tuned_model IS NOT NULL AND "
                           "model_deleted = 0 ORDER BY seq")

    # --- events -----------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None) -> None:
        with self._write() as db:
            db.execute("INSERT INTO events (id, job_id, created_at, level, message, type, data) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (new_id("ftevent-"), job_id, now(), level, message, type,
                        json.dumps(data) if data is not None else None))

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first, like OpenAI's list_events."""
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if after:
            cursor = self._one("SELECT seq FROM events WHERE id = ?", (after,))
            sql, args = sql + " AND seq < ?", args + [cursor["seq"] if cursor else -1]
        return self._query(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])

    def events_since(self, job_id: str, since: str | None, limit: int = 500) -> list[dict]:
        """Oldest first: the events newer than the event `since` (all when None), for a live
        stream that resumes from its client's cursor."""
        sql, args = "SELECT * FROM events WHERE job_id = ?", [job_id]
        if since:
            cursor = self._one("SELECT seq FROM events WHERE id = ?", (since,))
            sql, args = sql + " AND seq > ?", args + [cursor["seq"] if cursor else -1]
        return self._query(sql + " ORDER BY seq LIMIT ?", args + [limit])

    # --- checkpoints ------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model_name: str,
                       path: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO checkpoints (id, job_id, created_at, step_number, "
                       "metrics, model_name, path) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (new_id("ftckpt-"), job_id, now(), step, json.dumps(metrics),
                        model_name, path))

    def checkpoints(self, job_id: str | None = None) -> list[dict]:
        """Newest first; checkpoints whose files training has since pruned are dropped."""
        sql = "SELECT * FROM checkpoints" + (" WHERE job_id = ?" if job_id else "")
        rows = self._query(sql + " ORDER BY seq DESC", (job_id,) if job_id else ())
        gone = [r["id"] for r in rows if not Path(r["path"]).exists()]
        if gone:
            with self._write() as db:
                db.executemany("DELETE FROM checkpoints WHERE id = ?", [(g,) for g in gone])
        return [r for r in rows if r["id"] not in gone]

    def checkpoint_by_model(self, name: str) -> dict | None:
        row = self._one("SELECT * FROM checkpoints WHERE model_name = ?", (name,))
        return row if row and Path(row["path"]).exists() else None

    # --- ratings ----------------------------------------------------------------------------
    def add_rating(self, values: dict) -> dict:
        values = _encode({**values, "id": new_id("rating-"), "created_at": now()})
        columns = ", ".join(f'"{k}"' for k in values)  # "left" is an SQL keyword
        with self._write() as db:
            db.execute(f"INSERT INTO ratings ({columns}) VALUES "
                       f"({', '.join('?' for _ in values)})", list(values.values()))
        return self._one("SELECT * FROM ratings WHERE id = ?", (values["id"],))

    def ratings(self, after: str | None = None, limit: int = -1) -> list[dict]:
        """Newest first; `after` is the id of the last rating of the previous page; a negative
        limit returns them all."""
        sql, args = "SELECT * FROM ratings", []
        if after:
            cursor = self._one("SELECT seq FROM ratings WHERE id = ?", (after,))
            sql, args = sql + " WHERE seq < ?", [cursor["seq"] if cursor else -1]
        return self._query(sql + " ORDER BY seq DESC LIMIT ?", args + [limit])
