"""Exports started from the server (the dashboard's export buttons): each one is the CLI's own
`afinar export RUN --to FORMAT --json` in a child process, so it verifies exactly as the
command does and a crash in llama.cpp or the converter never takes the web process down.

State lives beside the server's database, one JSON file per export (STATE/exports/ID.json,
written atomically); the child's output goes to ID.log. A server restarted while an export
ran finds the file still 'running' with a dead process, and reports it interrupted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from afinar import rundir
from afinar.errors import AfinarError
from afinar.serve.errors import ApiError
from afinar.serve.ids import new_id, now

FORMATS = ("merged", "gguf", "gguf-adapter", "ollama")
_LOG_TAIL = 2000  # characters of the child's output kept in a failed export's message
# Finished exports whose record could not be written (a full disk), by id: still answered.
_UNSAVED: dict[str, dict] = {}


def exports_dir(state: Path) -> Path:
    return Path(state) / "exports"


def start_export(state: Path, version_id: str, run_dir: str, to: str,
                 quant: str | None = None) -> dict:
    if to not in FORMATS:
        raise AfinarError(f"unknown export format {to!r}", "use one of: " + ", ".join(FORMATS))
    folder = exports_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    export_id = new_id("export-")
    cmd = [sys.executable, "-m", "afinar", "export", run_dir, "--to", to, "--json"]
    if quant:
        cmd += ["--quant", quant]
    record = {"id": export_id, "object": "export", "version": version_id, "format": to,
              "quant": quant, "status": "running", "created_at": now(), "finished_at": None,
              "result": None, "error": None}
    log_path = folder / f"{export_id}.log"
    try:  # the record first: a full disk stops the export before anything starts
        _save(folder, record)
        log = open(log_path, "wb")
    except OSError as exc:
        _discard(folder, export_id)
        raise _storage_full(exc) from None
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    record["pid"] = proc.pid
    try:
        _save(folder, record)
    except OSError as exc:  # no record of it could be kept: it must not run unseen
        proc.kill()
        proc.wait()
        log.close()
        _discard(folder, export_id)
        raise _storage_full(exc) from None
    threading.Thread(target=_finish, args=(folder, record, proc, log), daemon=True).start()
    return _public(record)


def _storage_full(exc: OSError) -> ApiError:
    return ApiError(507, f"The server could not record the export: {exc.strerror or exc}. "
                    "Nothing was started; free space in the server's state folder and try "
                    "again.", code="storage_full")


def _discard(folder: Path, export_id: str) -> None:
    for name in (f"{export_id}.json", f"{export_id}.log"):
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError:
            pass


def _finish(folder: Path, record: dict, proc: subprocess.Popen, log) -> None:
    out, _ = proc.communicate()
    log.close()
    record = {**record, "finished_at": now()}
    text = out.decode("utf-8", "replace")
    if proc.returncode == 0:
        try:
            record.update(status="succeeded", result=json.loads(text[text.index("{"):]))
        except ValueError:
            record.update(status="failed", error="the export printed no result: " + text[-500:])
    else:
        tail = (folder / f"{record['id']}.log").read_text("utf-8", "replace")[-_LOG_TAIL:]
        record.update(status="failed", error=_reason(tail) or f"exit code {proc.returncode}")
    try:
        _save(folder, record)
    except OSError as exc:  # the disk is full: the answer is kept in memory instead
        record.update(status="failed", error=f"the export's result could not be recorded: "
                      f"{exc.strerror or exc}; free space and export again")
        _UNSAVED[record["id"]] = record


def _reason(log: str) -> str:
    """The CLI's own error lines (`error: ...` and its hint), else the log's last lines."""
    lines = [line.rstrip() for line in log.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.lower().startswith("error"):
            return "\n".join(lines[i:])[-_LOG_TAIL:]
    return "\n".join(lines[-8:])


def list_exports(state: Path, version_id: str | None = None) -> list[dict]:
    folder = exports_dir(state)
    records = [get_export(state, f.stem) for f in folder.glob("export-*.json")] \
        if folder.is_dir() else []
    records = [r for r in records if version_id is None or r["version"] == version_id]
    return sorted(records, key=lambda r: r["created_at"], reverse=True)


def get_export(state: Path, export_id: str) -> dict:
    if export_id in _UNSAVED:
        return _public(_UNSAVED[export_id])
    file = exports_dir(state) / f"{export_id}.json"
    if not export_id.startswith("export-") or not file.is_file():
        raise AfinarError(f"no export {export_id!r}")
    record = json.loads(file.read_text(encoding="utf-8"))
    if record["status"] == "running" and not _alive(record.get("pid")):
        record.update(status="failed", error="the server stopped while this export ran; "
                      "start it again")
    return _public(record)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)  # an exited child not yet reaped still answers: its thread is finishing
    except OSError:
        return False
    return True


def _save(folder: Path, record: dict) -> None:
    rundir.write_json_atomic(folder / f"{record['id']}.json", record)


def _public(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "pid"}
