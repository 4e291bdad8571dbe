"""The server's state: a database (serve/database.py: SQLite by default, PostgreSQL when asked)
and the uploaded files in the state folder (STATE/files/), which every machine running a
worker mounts.

Every object belongs to a project. A method that takes `project` returns only that project's
rows; `project=None` is the admin's view of all of them. Files are stored under their generated
id: a client's file name is only ever data, never a path.

Each write is one transaction, so the API and the workers (other processes, other machines)
never see each other's half-done changes. A job's lease (`claim_job`, `renew_lease`) says which
worker trains it; a worker's writes to its job name it (`worker=`), so a worker that lost its
lease cannot overwrite the job of the one that took over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import sqlalchemy as sa

from afinar.serve import tables as t
from afinar.serve.database import Database, database_url
from afinar.serve.ids import new_id, now

DEFAULT_PROJECT = "default"


def _decode(row) -> dict | None:
    if row is None:
        return None
    out = dict(row._mapping)
    for key in t.JSON_COLUMNS & out.keys():
        if out[key] is not None:
            out[key] = json.loads(out[key])
    return out


def _encode(values: dict) -> dict:
    return {k: json.dumps(v) if k in t.JSON_COLUMNS and v is not None else v
            for k, v in values.items()}


def _held(connection, job_id: str, worker: str) -> bool:
    """Whether `worker` holds the job; the row stays locked until the transaction ends, so a
    claim cannot take the job over in between."""
    return connection.execute(sa.select(t.jobs.c.worker).where(t.jobs.c.id == job_id)
                              .with_for_update()).scalar() == worker


def _in_project(table: sa.Table, project: str | None):
    return sa.true() if project is None else table.c.project == project


class Store:
    def __init__(self, folder: Path, url: str | None = None):
        self.folder = Path(folder)
        self.files_dir = self.folder / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(database_url(url, self.folder))
        self.db.migrate()

    def close(self) -> None:
        self.db.close()

    # --- plumbing ---------------------------------------------------------------------------
    def _query(self, statement) -> list[dict]:
        def work():
            with self.db.read() as connection:
                return [_decode(r) for r in connection.execute(statement).fetchall()]
        return self.db.retrying(work)

    def _one(self, statement) -> dict | None:
        rows = self._query(statement)
        return rows[0] if rows else None

    def _write(self, work):
        """`work(connection)` in one write transaction, retried whole if the database was
        unreachable."""
        def attempt():
            with self.db.write() as connection:
                return work(connection)
        return self.db.retrying(attempt)

    def _page(self, statement, table: sa.Table, after: str | None, newest_first: bool = True):
        """Rows after the row `after` (an id) in `seq` order: the cursor of OpenAI's lists."""
        if after:
            cursor = sa.select(table.c.seq).where(table.c.id == after).scalar_subquery()
            statement = statement.where(table.c.seq < cursor if newest_first
                                        else table.c.seq > cursor)
        return statement.order_by(table.c.seq.desc() if newest_first else table.c.seq)

    # --- files ------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, file_id: str, filename: str, size: int, purpose: str,
                 status: str = "processed", project: str = DEFAULT_PROJECT) -> dict:
        self._write(lambda c: c.execute(t.files.insert().values(
            id=file_id, filename=filename, bytes=size, purpose=purpose, created_at=now(),
            status=status, project=project)))
        return self.file(file_id)

    def file(self, file_id: str, project: str | None = None) -> dict | None:
        return self._one(sa.select(t.files).where(
            t.files.c.id == file_id, t.files.c.deleted == 0, _in_project(t.files, project)))

    def files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
              order: str = "desc", project: str | None = None) -> list[dict]:
        statement = sa.select(t.files).where(t.files.c.deleted == 0,
                                             _in_project(t.files, project))
        if purpose:
            statement = statement.where(t.files.c.purpose == purpose)
        return self._query(self._page(statement, t.files, after, order == "desc").limit(limit))

    def usage(self, project: str) -> tuple[int, int]:
        """(files, bytes) a project holds: its upload quota."""
        row = self._one(sa.select(sa.func.count().label("n"),
                                  sa.func.coalesce(sa.func.sum(t.files.c.bytes), 0).label("b"))
                        .where(t.files.c.deleted == 0, t.files.c.project == project))
        return int(row["n"]), int(row["b"])

    def delete_file(self, file_id: str) -> bool:
        changed = self._write(lambda c: c.execute(
            t.files.update().where(t.files.c.id == file_id, t.files.c.deleted == 0)
            .values(deleted=1)).rowcount)
        self.file_path(file_id).unlink(missing_ok=True)
        return bool(changed)

    # --- jobs -------------------------------------------------------------------------------
    def add_job(self, values: dict) -> dict:
        values = _encode({"project": DEFAULT_PROJECT, **values, "created_at": now()})
        self._write(lambda c: c.execute(t.jobs.insert().values(**values)))
        return self.job(values["id"])

    def job(self, job_id: str, project: str | None = None) -> dict | None:
        return self._one(sa.select(t.jobs).where(t.jobs.c.id == job_id,
                                                 _in_project(t.jobs, project)))

    def jobs(self, after: str | None = None, limit: int = 20, metadata: dict | None = None,
             project: str | None = None) -> list[dict]:
        """Newest first; `after` is the id of the last job of the previous page."""
        rows = self._query(self._page(sa.select(t.jobs).where(_in_project(t.jobs, project)),
                                      t.jobs, after))
        if metadata:
            rows = [r for r in rows if all((r["metadata"] or {}).get(k) == v
                                           for k, v in metadata.items())]
        return rows[:limit]

    def update_job(self, job_id: str, when_status: tuple[str, ...] | None = None,
                   worker: str | None = None, **values) -> bool:
        """Sets `values`; with `when_status`, only if the job is in one of those statuses (so a
        cancel never overwrites a job that has just finished); with `worker`, only while that
        worker holds the job. True when it changed."""
        statement = t.jobs.update().where(t.jobs.c.id == job_id).values(**_encode(values))
        if when_status:
            statement = statement.where(t.jobs.c.status.in_(when_status))
        if worker is not None:
            statement = statement.where(t.jobs.c.worker == worker)
        return bool(self._write(lambda c: c.execute(statement).rowcount))

    def claim_job(self, worker: str, lease_seconds: float) -> tuple[dict, dict] | None:
        """The oldest job a worker may take: a queued one (once the wait after a crashed
        attempt, held in its lease_until, is over), or a running one whose worker's lease has
        expired (it died, or its machine vanished). It becomes this worker's, leased
        for `lease_seconds`, its attempts counted. Returns (job as it is now, job as it was),
        or None. On PostgreSQL, FOR UPDATE SKIP LOCKED lets workers claim at the same time
        without taking the same job or waiting for each other; SQLite's writers take turns."""
        def work(c):
            moment = time.time()
            found = c.execute(
                sa.select(t.jobs).where(sa.or_(
                    sa.and_(t.jobs.c.status == "queued",
                            sa.or_(t.jobs.c.lease_until.is_(None), t.jobs.c.lease_until < moment)),
                    sa.and_(t.jobs.c.status == "running", t.jobs.c.lease_until < moment)))
                .order_by(t.jobs.c.seq).limit(1).with_for_update(skip_locked=True)).first()
            if found is None:
                return None
            before = _decode(found)
            c.execute(t.jobs.update().where(t.jobs.c.id == before["id"]).values(
                status="running", worker=worker, lease_until=moment + lease_seconds,
                attempts=t.jobs.c.attempts + 1, worker_pid=None))
            return before
        before = self._write(work)
        if before is None:
            return None
        return self.job(before["id"]), before

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extends the lease; False when this worker no longer holds the job (it expired and
        another worker took it, or the job ended)."""
        return self.update_job(job_id, when_status=("running",), worker=worker,
                               lease_until=time.time() + lease_seconds)

    def jobs_in(self, *statuses: str) -> list[dict]:
        return self._query(sa.select(t.jobs).where(t.jobs.c.status.in_(statuses))
                           .order_by(t.jobs.c.seq))

    def job_by_model(self, name: str, project: str | None = None) -> dict | None:
        return self._one(sa.select(t.jobs).where(t.jobs.c.fine_tuned_model == name,
                                                 t.jobs.c.model_deleted == 0,
                                                 _in_project(t.jobs, project)))

    def fine_tuned_jobs(self, project: str | None = None) -> list[dict]:
        return self._query(sa.select(t.jobs).where(
            t.jobs.c.fine_tuned_model.is_not(None), t.jobs.c.model_deleted == 0,
            _in_project(t.jobs, project)).order_by(t.jobs.c.seq))

    # --- events -----------------------------------------------------------------------------
    def add_event(self, job_id: str, message: str, level: str = "info", type: str = "message",
                  data: dict | None = None, worker: str | None = None) -> bool:
        """With `worker`, only while that worker holds the job (a worker that lost its lease
        during a database outage must not add to the job another worker now trains)."""
        def work(c):
            if worker is not None and not _held(c, job_id, worker):
                return False
            c.execute(t.events.insert().values(
                id=new_id("ftevent-"), job_id=job_id, created_at=now(), level=level,
                message=message, type=type, data=json.dumps(data) if data is not None else None))
            return True
        return self._write(work)

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> list[dict]:
        """Newest first, like OpenAI's list_events."""
        statement = sa.select(t.events).where(t.events.c.job_id == job_id)
        return self._query(self._page(statement, t.events, after).limit(limit))

    def events_since(self, job_id: str, since: str | None, limit: int = 500) -> list[dict]:
        """Oldest first: the events newer than the event `since` (all when None), for a live
        stream that resumes from its client's cursor."""
        statement = sa.select(t.events).where(t.events.c.job_id == job_id)
        return self._query(self._page(statement, t.events, since, newest_first=False)
                           .limit(limit))

    # --- checkpoints ------------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, metrics: dict, model_name: str,
                       path: str, worker: str | None = None) -> None:
        def work(c):  # a step checkpointed again (a resumed attempt) replaces the old row
            if worker is not None and not _held(c, job_id, worker):
                return
            c.execute(t.checkpoints.delete().where(t.checkpoints.c.model_name == model_name))
            c.execute(t.checkpoints.insert().values(
                id=new_id("ftckpt-"), job_id=job_id, created_at=now(), step_number=step,
                metrics=json.dumps(metrics), model_name=model_name, path=path))
        self._write(work)

    def checkpoints(self, job_id: str | None = None) -> list[dict]:
        """Newest first; checkpoints whose files training has since pruned are dropped."""
        statement = sa.select(t.checkpoints)
        if job_id:
            statement = statement.where(t.checkpoints.c.job_id == job_id)
        rows = self._query(statement.order_by(t.checkpoints.c.seq.desc()))
        gone = [r["id"] for r in rows if not Path(r["path"]).exists()]
        if gone:
            self._write(lambda c: c.execute(t.checkpoints.delete().where(
                t.checkpoints.c.id.in_(gone))))
        return [r for r in rows if r["id"] not in gone]

    def checkpoint_by_model(self, name: str, project: str | None = None) -> dict | None:
        """A checkpoint model by name, when its job is in `project` and its files exist."""
        statement = (sa.select(t.checkpoints).join(t.jobs, t.jobs.c.id == t.checkpoints.c.job_id)
                     .where(t.checkpoints.c.model_name == name, _in_project(t.jobs, project)))
        row = self._one(statement)
        return row if row and Path(row["path"]).exists() else None

    # --- ratings ----------------------------------------------------------------------------
    def add_rating(self, values: dict, project: str = DEFAULT_PROJECT) -> dict:
        values = _encode({**values, "id": new_id("rating-"), "created_at": now(),
                          "project": project})
        self._write(lambda c: c.execute(t.ratings.insert().values(**values)))
        return self._one(sa.select(t.ratings).where(t.ratings.c.id == values["id"]))

    def ratings(self, after: str | None = None, limit: int = -1,
                project: str | None = None) -> list[dict]:
        """Newest first; `after` is the id of the last rating of the previous page; a negative
        limit returns them all."""
        statement = self._page(sa.select(t.ratings).where(_in_project(t.ratings, project)),
                               t.ratings, after)
        return self._query(statement.limit(limit) if limit >= 0 else statement)
