"""bench_team.py's fault (e), the state folder's filesystem full: StorageFullFault, a mixin of
bench_team.Bench (a small deployment on a tmpfs or loop-mounted ext4, filling it, an upload, a
job's checkpoint write and an export on the full disk, then space freed), and failed_writes
(which write met the full disk, from the worker's log)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from _team_deploy import (DATA, FINAL, Api, Deployment, Timeout, check_events, error_code,
                          error_message, job_spec, latest_step, multipart, wait_until)


class StorageFullFault:
    """Fault (e) of Bench's `faults` section; uses the Bench's state (self.main, self.small,
    self.args, self.pg, self.work) and its _version_of() and checkpoints_sound()."""

    # --- (e) storage full --------------------------------------------------------------------
    def small_deployment(self) -> Deployment | None:
        if self.small is not None:
            return self.small
        folder = self.work / "small"
        folder.mkdir()
        how = None
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.args.small_fs_mb}m",
                               "tmpfs", str(folder)], capture_output=True, text=True, timeout=60)
        if done.returncode == 0:
            how = f"tmpfs of {self.args.small_fs_mb} MB (mount -t tmpfs)"
        else:
            image = self.work / "small.img"
            tried = [f"tmpfs: {done.stderr.strip()}"]
            steps = [["truncate", "-s", f"{self.args.small_fs_mb}M", str(image)],
                     ["mkfs.ext4", "-q", "-F", str(image)],
                     ["mount", "-o", "loop", str(image), str(folder)]]
            for cmd in steps:
                step = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if step.returncode:
                    tried.append(f"{' '.join(cmd[:2])}: {step.stderr.strip()}")
                    self.storage_note = "not possible on this machine: " + "; ".join(tried)
                    return None
            how = f"loop-mounted ext4 of {self.args.small_fs_mb} MB ({tried[0]})"
        self.mounted = folder
        self.storage_note = how
        state = folder / "state"
        state.mkdir()
        self.small = Deployment("small", self.work, self.logs, self.model, self.pg.create_database(
            "small"), state, self.work / "small-home", self.args.engine, self.args.lease_seconds,
            [None])
        self.small.start_api()
        self.small.start_worker(0)
        return self.small

    @staticmethod
    def _fill(folder: Path, leave: int = 0) -> tuple[Path, int]:
        """A filler file taking every free byte of `folder`'s filesystem but `leave`."""
        filler = folder / "filler.bin"
        written = 0
        with open(filler, "ab", buffering=0) as handle:
            if leave:
                target = shutil.disk_usage(folder).free - leave
                block = b"\0" * (1 << 20)
                while written < target:
                    piece = block[: min(len(block), target - written)]
                    try:
                        handle.write(piece)
                    except OSError:
                        break
                    written += len(piece)
                return filler, written
            for chunk in (1 << 20, 1 << 12, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        handle.write(block)
                        written += chunk
                    except OSError:
                        break
        return filler, written

    def fault_storage_full(self, repeat: int) -> list[dict]:
        dep = self.small_deployment()
        if dep is None:
            return [{"fault": "e", "did": "storage full", "ended": self.storage_note}]
        state, out = dep.state, []
        small = self.work / "small-data.jsonl"
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:24]))
        client = dep.key("team-a")
        file_id = dep.upload("team-a", DATA, "data.jsonl")
        # A finished job to export.
        done = dep.submit("team-a", file_id, job_spec(4, 2, epochs=1))
        finished = dep.wait_job(done, 300)
        version = self._version_of(dep, client, done)
        free_before = shutil.disk_usage(state).free

        # (i) an upload on a full disk
        filler, filled = self._fill(state)
        files_before = {f["id"] for f in client.get("/files")[1]["data"]}
        status, body = client.call("POST", "/files", *self._upload_body(small))
        files_after = {f["id"] for f in client.get("/files")[1]["data"]}
        leftovers = sorted(p.name for p in (state / "files").iterdir()
                           if p.name.startswith(".upload-"))
        listed = sorted(files_after - files_before)
        out.append({"fault": "e", "part": "i upload", "did": f"upload of {small.stat().st_size} "
                    f"bytes with the state folder's filesystem full ({self.storage_note}; "
                    f"{filled} bytes of filler)", "got": f"{status} {error_code(body)}",
                    "ended": f"{status} {error_code(body)}", "user_error": error_message(body),
                    "file_listed": listed, "temp_files_left": leftovers,
                    "job_lost": False, "half_written_served": bool(listed)})

        # (iii) an export on a full disk
        export = {"fault": "e", "part": "iii export", "version": version,
                  "did": "POST /v1/registry/versions/{id}/exports (merged) on the full disk"}
        if version:
            export.update(self._export(client, version, 240))
        else:
            export["ended"] = f"no registry version found for job {done} ({finished.get('status')})"
        export["job_lost"] = False
        export["half_written_served"] = export.get("status") == "succeeded"
        filler.unlink()

        # (ii) a job whose checkpoint write meets the full disk: kept full / freed after a failure
        for variant in ("kept full", "room for logs, not for a checkpoint",
                        "freed after the first failure"):
            out.append(self._full_during_job(dep, file_id, variant))
        out.append(export)

        # freed: everything works again
        status, body = client.call("POST", "/files", *self._upload_body(small))
        after_job = dep.submit("team-a", file_id, job_spec(4, 2, epochs=1))
        after = dep.wait_job(after_job, 300)
        version2 = self._version_of(dep, client, after_job)
        again = self._export(client, version2, 240) if version2 else {"ended": "no version"}
        out.append({"fault": "e", "part": "space freed", "did": "filler deleted: upload, a job, "
                    "an export", "ended": f"upload {status}; job {after.get('status')}; export "
                    f"{again.get('status')}", "upload_status": status,
                    "job_status": after.get("status"), "export": again, "job_lost": False,
                    "half_written_served": False, "free_bytes_before_filling": free_before})
        return out

    @staticmethod
    def _upload_body(path: Path, name: bytes = b"data.jsonl") -> tuple:
        body, ctype = multipart({"purpose": "fine-tune"}, "file", name, path.read_bytes())
        return body, {"Content-Type": ctype}

    def _export(self, api: Api, version: str, timeout: float) -> dict:
        state = self.small.state if self.small and api.base == self.small.base \
            else self.main.state
        status, body = api.call("POST", f"/registry/versions/{version}/exports",
                                {"format": "merged"})
        if status != 200:
            time.sleep(1)
            folder = state / "exports"
            untracked = sorted(p.name for p in folder.glob("export-*.log")
                               if not p.with_suffix(".json").exists()) if folder.is_dir() else []
            children = subprocess.run(["pgrep", "-af", "afinar export"], capture_output=True,
                                      text=True, timeout=30).stdout.splitlines()
            return {"start_status": status, "status": None, "ended": f"{status} at start: "
                    f"{error_message(body)}", "user_error": error_message(body),
                    "export_logs_without_a_record": untracked,
                    "export_processes_running": [c for c in children if str(state) in c]}
        export_id = body["id"]

        def finished():
            s, record = api.get(f"/registry/exports/{export_id}")
            return record if s == 200 and record["status"] != "running" else None
        try:
            record = wait_until(finished, timeout, f"export {export_id}", 1)
        except Timeout:
            return {"start_status": status, "status": "running", "ended": "still running"}
        return {"start_status": status, "status": record["status"],
                "ended": f"export {record['status']}", "user_error": record.get("error")}

    def _full_during_job(self, dep: Deployment, file_id: str, variant: str) -> dict:
        state, sizes = dep.state, dep.log_sizes()
        job_id = dep.submit("team-a", file_id, job_spec(self.args.fault_steps * 2, 
                                                         self.args.fault_steps, seed=3))
        started = wait_until(lambda: latest_step(dep.recent_events(job_id, 5)), 120,
                             f"{job_id} to train", 0.05)
        # "room": 300 KB left, enough for the metrics' lines, not for a checkpoint (~430 KB)
        filler, filled = self._fill(state, 300 * 1024 if variant.startswith("room") else 0)
        if variant.startswith("freed"):
            try:
                wait_until(lambda: any(e["level"] in ("warn", "error") and ("failed" in
                                                                            e["message"]) for e in
                                       dep.recent_events(job_id, 10)), 180,
                           "a failure", 0.2)
            except Timeout:
                pass
            filler.unlink()
        job = dep.wait_job(job_id, 300)
        if filler.exists():
            filler.unlink()
        events = dep.events(job_id)
        sound = self.checkpoints_sound(dep, job_id)
        problems = [e["message"] for e in events if e["level"] in ("warn", "error")
                    and "examples" not in e["message"] and "system prompt" not in e["message"]]
        return {"fault": "e", "part": f"ii job ({variant})", "job": job_id,
                "did": f"filled the disk ({variant}) at step {started} of a job checkpointing "
                       f"every {self.args.fault_steps} steps",
                "failed_writes": failed_writes(dep.since(sizes)),
                "ended": job.get("status") + (f" ({(job.get('error') or {}).get('code')})"
                                              if job.get("error") else ""),
                "user_error": (job.get("error") or {}).get("message"),
                "warnings": problems[:6], "attempts": check_events(events)["attempts"],
                "job_lost": job.get("status") not in FINAL,
                "half_written_served": sound["half_written_served"], "checkpoints": sound}


def failed_writes(text: str) -> list[str]:
    """The innermost afinar frame of each traceback in `text` (worker log output) that ends in
    ENOSPC: which write met the full disk."""
    found = []
    for block in text.split("Traceback (most recent call last):")[1:]:
        lines = [line.strip() for line in block.splitlines()]
        if not any("No space left" in line for line in lines):
            continue
        ours = [line for line in lines if line.startswith('File "') and "/afinar/" in line
                and "site-packages" not in line]
        if ours:
            where = ours[-1].split("/afinar/", 1)[1]
            if where not in found:
                found.append(where)
    return found[:8]
