"""The registry of model versions: every trained run, with short ids (v1, v2, ...) and tags.

    with open_registry() as reg:          # AFINAR_HOME/registry.db
        version = reg.record_run(run_dir)  # after training or evaluation; safe to repeat
        reg.tag(version.id, "prod")
        reg.get("prod").metrics

The run directory is the source of truth: `record_run` copies run.json, config.yaml and
report.json into the database and never writes back, so re-recording a run only refreshes it.
Several processes (two trainings finishing at once) may write at the same time: every write is
one `BEGIN IMMEDIATE` transaction on a WAL database, which serialises writers through SQLite's
own lock instead of failing or handing out the same id twice.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from afinar import rundir
from afinar.errors import AfinarError
from afinar.paths import afinar_home

REGISTRY_FILE = "registry.db"
REPORT_FILE = "report.json"
_LIST_HINT = "see the registered versions with `afinar models list`"
_ID = re.compile(r"[vV]?(\d+)")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# AUTOINCREMENT (not plain INTEGER PRIMARY KEY) so that the id of a removed version is never
# handed out again: `v3` must keep meaning the same model in notes and scripts.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    num          INTEGER PRIMARY KEY AUTOINCREMENT,
    path         TEXT NOT NULL UNIQUE,
    status       TEXT,
    base_model   TEXT,
    method       TEXT,
    data_path    TEXT,
    data_sha256  TEXT,
    data_size    INTEGER,
    config       TEXT,
    started_at   TEXT,
    finished_at  TEXT,
    metrics      TEXT NOT NULL DEFAULT '{}',
    eval_metrics TEXT NOT NULL DEFAULT '[]',
    error        TEXT
);
CREATE TABLE IF NOT EXISTS tags (
    name    TEXT PRIMARY KEY,
    version INTEGER NOT NULL REFERENCES versions(num) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS tags_by_version ON tags(version);
"""
_SCHEMA_VERSION = 1
_COLUMNS = ("path", "status", "base_model", "method", "data_path", "data_sha256", "data_size",
            "config", "started_at", "finished_at", "metrics", "eval_metrics", "error")


@dataclass
class Version:
    """One registered run. `metrics` merges evaluation numbers (report.json) over training ones
    (run.json's summary); `eval_metrics` names the keys that came from the evaluation."""

    id: str
    path: str
    status: str | None = None
    base_model: str | None = None
    method: str | None = None
    data_path: str | None = None
    data_sha256: str | None = None
    data_size: int | None = None
    config: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    metrics: dict = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    error: str | None = None
    eval_metrics: list[str] = field(default_factory=list)


def open_registry(path: Path | None = None) -> Registry:
    """Opens (creating if needed) the registry database, by default AFINAR_HOME/registry.db."""
    path = Path(path) if path is not None else afinar_home() / REGISTRY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return Registry(path)


class Registry:
    def __init__(self, path: Path):
        self.path = path
        # isolation_level=None: the sqlite3 module must not open transactions behind our back;
        # every write below opens its own BEGIN IMMEDIATE.
        self._db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        _use_wal(self._db)
        if self._db.execute("PRAGMA user_version").fetchone()[0] >= _SCHEMA_VERSION:
            return  # readers such as `models list` then never wait for a writer's lock
        with self._write() as db:
            # One statement at a time: executescript() would COMMIT our transaction first.
            for statement in _statements():
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self):
        # IMMEDIATE takes the write lock up front (waiting up to `timeout` for it), so a writer
        # never reads, then finds its snapshot stale at the first write and fails with "locked".
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def record_run(self, run_dir: Path | str) -> Version:
        """Registers a run directory, or refreshes it if already registered (same id)."""
        run = Path(run_dir).expanduser().resolve()
        if not run.is_dir() or not rundir.is_run_dir(run):
            raise AfinarError(f"{run} is not a run directory (no {rundir.RUN_FILE})",
                              "pass the folder `afinar train` wrote (its --output)")
        row = _read_run(run)
        with self._write() as db:
            found = db.execute("SELECT num FROM versions WHERE path = ?", (row["path"],)).fetchone()
            if found:
                sets = ", ".join(f"{c} = ?" for c in _COLUMNS)
                db.execute(f"UPDATE versions SET {sets} WHERE num = ?",
                           [row[c] for c in _COLUMNS] + [found["num"]])
                num = found["num"]
            else:
                marks = ", ".join("?" for _ in _COLUMNS)
                num = db.execute(f"INSERT INTO versions ({', '.join(_COLUMNS)}) VALUES ({marks})",
                                 [row[c] for c in _COLUMNS]).lastrowid
        return self._by_num(num)

    def get(self, ref: str | Path) -> Version:
        """Finds a version by id (`v3` or `3`), tag, or run directory path."""
        text = str(ref).strip()
        match = _ID.fullmatch(text)
        if match:
            version = self._by_num(int(match.group(1)))
            if version is None:
                raise AfinarError(f"no model version v{int(match.group(1))}", _LIST_HINT)
            return version
        tagged = self._db.execute("SELECT version FROM tags WHERE name = ?", (text,)).fetchone()
        if tagged:
            return self._by_num(tagged["version"])
        path = str(Path(text).expanduser().resolve())
        found = self._db.execute("SELECT num FROM versions WHERE path = ?", (path,)).fetchone()
        if found:
            return self._by_num(found["num"])
        raise AfinarError(f"no model version, tag or registered run directory {text!r}",
                          _LIST_HINT)

    def list(self) -> list[Version]:
        """All versions, newest first."""
        rows = self._db.execute("SELECT * FROM versions ORDER BY num DESC").fetchall()
        tags = self._tags()
        return [_version(row, tags.get(row["num"], [])) for row in rows]

    def tag(self, ref: str, tag: str) -> Version:
        """Points `tag` at a version; a tag already on another version moves (like docker)."""
        _check_tag(tag)
        with self._write() as db:
            num = int(self.get(ref).id[1:])
            db.execute("INSERT INTO tags (name, version) VALUES (?, ?) "
                       "ON CONFLICT(name) DO UPDATE SET version = excluded.version", (tag, num))
        return self._by_num(num)

    def untag(self, tag: str) -> Version:
        """Removes a tag; returns the version it pointed at."""
        with self._write() as db:
            row = db.execute("SELECT version FROM tags WHERE name = ?", (tag,)).fetchone()
            if row is None:
                raise AfinarError(f"no tag {tag!r}", _LIST_HINT)
            db.execute("DELETE FROM tags WHERE name = ?", (tag,))
        return self._by_num(row["version"])

    def remove(self, ref: str) -> Version:
        """Unregisters a version and drops its tags; the run directory's files are untouched."""
        with self._write() as db:
            version = self.get(ref)
            num = int(version.id[1:])
            db.execute("DELETE FROM tags WHERE version = ?", (num,))
            db.execute("DELETE FROM versions WHERE num = ?", (num,))
        return version

    def _by_num(self, num: int) -> Version | None:
        row = self._db.execute("SELECT * FROM versions WHERE num = ?", (num,)).fetchone()
        return _version(row, self._tags().get(num, [])) if row else None

    def _tags(self) -> dict[int, list[str]]:
        tags: dict[int, list[str]] = {}
        for row in self._db.execute("SELECT name, version FROM tags ORDER BY name"):
            tags.setdefault(row["version"], []).append(row["name"])
        return tags


def metric_direction(name: str) -> str | None:
    """"lower" or "higher" is better, or None for bookkeeping numbers that are not a score."""
    lowered = name.lower()
    if lowered.startswith("check:"):  # pass rates, whatever the check's name says
        return "higher"
    if any(w in lowered for w in _LOWER_WORDS):
        return "lower"
    if lowered in _BOOKKEEPING:
        return None
    return "higher"


# Costs and failures: evaluation's probes_leaks / probes_changed count regressions.
_LOWER_WORDS = ("loss", "perplexity", "seconds", "memory", "latency", "leak", "changed")
# Training counts (steps run, tokens seen) describe a run; more of them is not "better".
_BOOKKEEPING = {"steps", "epochs", "total_steps", "best_step", "tokens_seen", "trainable_params",
                "processes", "stopped_early", "examples", "tokens_per_s"}


def compare_rows(versions: list[Version]) -> list[tuple[str, list]]:
    """The union of the versions' metric names, each with one value per version (None where a
    version lacks it): evaluation metrics first, then training ones, each in first-seen order."""
    evaluated, trained = {}, {}
    for version in versions:
        for name in version.metrics:
            (evaluated if name in version.eval_metrics else trained).setdefault(name, None)
    names = list(evaluated) + [n for n in trained if n not in evaluated]
    return [(name, [v.metrics.get(name) for v in versions]) for name in names]


def config_diff_rows(versions: list[Version]) -> list[tuple[str, list]]:
    """The settings (dotted names, e.g. `lora.r`) whose values differ between the versions'
    resolved configs, each with one value per version (None where a version lacks it)."""
    flat = [_flatten(yaml.safe_load(v.config) or {}) if v.config else {} for v in versions]
    names = list(dict.fromkeys(name for config in flat for name in config))
    rows = [(name, [config.get(name) for config in flat]) for name in names]
    return [(name, values) for name, values in rows if len({json.dumps(v) for v in values}) > 1]


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def loss_curves(version: Version) -> dict:
    """The run's training and held-out losses by step, from its metrics.jsonl."""
    train, held = {}, {}
    file = Path(version.path) / rundir.METRICS_FILE
    if file.is_file():
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill: the rest of the file still counts
            if record.get("type") == "train" and isinstance(record.get("train_loss"), float):
                train[record["step"]] = record["train_loss"]
            elif record.get("type") == "eval" and isinstance(record.get("eval_loss"), float):
                held[record["step"]] = record["eval_loss"]  # a resumed run may repeat a step
    return {"train": sorted(train.items()), "eval": sorted(held.items())}


def _statements() -> list[str]:
    return [s.strip() for s in _SCHEMA.split(";") if s.strip()]


def _use_wal(db: sqlite3.Connection) -> None:
    # WAL lets readers (`afinar models list`) run while a training records its run. Switching a
    # new file to WAL needs a lock the busy timeout does not always cover, so retry briefly;
    # once switched, the mode is stored in the file and this is a cheap read.
    for attempt in range(100):
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _check_tag(tag: str) -> None:
    if not _TAG.fullmatch(tag):
        raise AfinarError(f"bad tag name {tag!r}", "use letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit, e.g. prod or best-2024.05")
    if _ID.fullmatch(tag):
        raise AfinarError(f"tag {tag!r} looks like a version id",
                          "pick a name that is not vN or a number, e.g. prod or candidate")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AfinarError(f"{path}: cannot read JSON: {exc}",
                          "the run directory is damaged; re-run or evaluate it again") from None


def _scalars(data) -> dict:
    # Only numbers (and flags/None) are metrics; run.json's summary also holds words such as
    # the precision, which a comparison table has no use for.
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if v is None or isinstance(v, (int, float, bool))}


def _read_run(run: Path) -> dict:
    info = _read_json(run / rundir.RUN_FILE) if (run / rundir.RUN_FILE).is_file() else {}
    if not isinstance(info, dict):
        raise AfinarError(f"{run / rundir.RUN_FILE}: expected a JSON object")
    report_file = run / REPORT_FILE
    report = _read_json(report_file) if report_file.is_file() else {}
    evaluated = _scalars(report.get("summary") if isinstance(report, dict) else None)
    metrics = {**evaluated, **{k: v for k, v in _scalars(info.get("summary")).items()
                               if k not in evaluated}}
    config_file = run / rundir.CONFIG_FILE
    size = info.get("data_size")
    text = {key: None if info.get(key) is None else str(info[key])
            for key in ("status", "base_model", "method", "data", "data_sha256", "created_at",
                        "finished_at", "error")}
    return {
        "path": str(run), "status": text["status"], "base_model": text["base_model"],
        "method": text["method"], "data_path": text["data"], "data_sha256": text["data_sha256"],
        "data_size": size if isinstance(size, int) and not isinstance(size, bool) else None,
        "config": config_file.read_text(encoding="utf-8") if config_file.is_file() else None,
        "started_at": text["created_at"], "finished_at": text["finished_at"],
        "metrics": json.dumps(metrics), "eval_metrics": json.dumps(list(evaluated)),
        "error": text["error"],
    }


def _version(row: sqlite3.Row, tags: list[str]) -> Version:
    values = {c: row[c] for c in _COLUMNS}
    values["metrics"] = json.loads(values["metrics"] or "{}")
    values["eval_metrics"] = json.loads(values["eval_metrics"] or "[]")
    return Version(id=f"v{row['num']}", tags=tags, **values)


def registered_run(ref: str) -> Path | None:
    """The run directory a version id or tag names (`v3`, `3`, `prod`), or None: lets every
    command that takes a model also take a registered version."""
    if "/" in ref or Path(ref).exists() or not (_ID.fullmatch(ref) or _TAG.fullmatch(ref)):
        return None
    db_file = afinar_home() / REGISTRY_FILE
    if not db_file.is_file():
        return None
    with open_registry(db_file) as registry:
        try:
            return Path(registry.get(ref).path)
        except AfinarError:
            return None
