"""bench_team.py's `faults` section: Inotify (to catch a checkpoint being written) and
FaultsSection, a mixin of bench_team.Bench: the reference job, the section itself, faults (a)
worker killed, (b) killed inside a checkpoint write, (c) API killed, (d) PostgreSQL restarted
or killed, (f) newest checkpoint corrupted, and the checks of a job after a fault. Fault (e),
storage full, is in _team_storage.py (StorageFullFault, another mixin of Bench)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random
import select
import signal
import socket
import struct
import time
import traceback
from pathlib import Path

from _team_deploy import (DATA, FINAL, RUNNING, Deployment, Timeout, check_events,
                          compare_adapters, job_spec, latest_step, log, wait_until, worker_of)
from _team_load import Load


# --- inotify, to catch a checkpoint being written ------------------------------------------------

class Inotify:
    IN_MODIFY, IN_CREATE, IN_MOVED_TO, IN_NONBLOCK = 0x2, 0x100, 0x80, 0o4000

    def __init__(self):
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watches: dict[int, Path] = {}

    def watch(self, folder: Path, mask: int) -> None:
        wd = self.libc.inotify_add_watch(self.fd, str(folder).encode(), mask)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")
        self.watches[wd] = folder

    def read(self, timeout: float) -> list[tuple[Path, int, str]]:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 65536)
        out, offset = [], 0
        while offset + 16 <= len(data):
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16: offset + 16 + length].split(b"\0", 1)[0].decode()
            out.append((self.watches.get(wd, Path("?")), mask, name))
            offset += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


class FaultsSection:
    """Bench's `faults` section (section_faults) and every fault but (e), which is
    StorageFullFault's; uses the Bench's state (self.main, self.args, self.pg, self.work) and its
    settle()."""

    def fault_spec(self) -> dict:
        return job_spec(self.args.fault_steps, self.args.fault_save_steps, seed=11)

    def ensure_reference(self) -> dict:
        if self.reference is not None:
            return self.reference
        dep = self.main
        self.fault_file = dep.upload("team-a", DATA, "fault-data.jsonl")
        started = time.monotonic()
        job_id = dep.submit("team-a", self.fault_file, self.fault_spec())
        job = dep.wait_job(job_id, 600)
        events = dep.events(job_id)
        self.reference = {"job": job_id, "status": job.get("status"),
                          "seconds": round(time.monotonic() - started, 1),
                          "steps": self.args.fault_steps,
                          "save_steps": self.args.fault_save_steps,
                          "spec": self.fault_spec(), "events": check_events(events),
                          "adapter": str(dep.adapter(job_id))}
        log(f"reference job {job_id}: {job.get('status')} in {self.reference['seconds']} s")
        return self.reference

    def job_outcome(self, dep: Deployment, job_id: str, timeout: float) -> dict:
        job = dep.wait_job(job_id, timeout)
        events = dep.events(job_id)
        checked = check_events(events)
        warnings = [e["message"] for e in events if e["level"] in ("warn", "error")
                    and "examples" not in e["message"] and "system prompt" not in e["message"]]
        around = []
        marks = [i for i, e in enumerate(events) if RUNNING.match(e["message"])]
        for mark in marks[1:]:  # what happened around each attempt after the first
            around.append([f"{e['created_at']} {e['message'][:160]}"
                           for e in events[max(0, mark - 4): mark + 10]])
        return {"job": job_id, "status": job.get("status"), "timed_out": job.get("timed_out",
                                                                                    False),
                "around_later_attempts": around,
                "error": job.get("error"), "events": checked, "warnings": warnings[:8],
                "resumed": [e["message"] for e in events if "resumed from" in e["message"]
                            or "starts again" in e["message"] or "continues from" in
                            e["message"]][:6]}

    def lost_jobs(self, dep: Deployment, ids: list[str]) -> list[str]:
        """Jobs that vanished or never reached a final state."""
        lost = []
        for job_id in ids:
            job = dep.job(job_id)
            if job is None or job["status"] not in FINAL:
                lost.append(f"{job_id}: {job['status'] if job else 'not found'}")
        return lost

    def checkpoints_sound(self, dep: Deployment, job_id: str) -> dict:
        """Every step-* folder of the run loads; every checkpoint the API lists has a sound
        folder; what else lies in the checkpoints folder (temp folders, damaged ones)."""
        import torch

        folder = dep.run_dir(job_id) / "checkpoints"
        broken, entries = [], []
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                size = (entry / "state.pt").stat().st_size if (entry / "state.pt").is_file() \
                    else None
                entries.append({"name": entry.name, "state_pt_bytes": size})
                if entry.name.startswith("step-"):
                    try:
                        torch.load(entry / "state.pt", map_location="cpu", weights_only=False)
                    except Exception as exc:
                        broken.append(f"{entry.name}: {exc.__class__.__name__}: "
                                      f"{str(exc)[:120]}")
        status, body = dep.admin.get(f"/fine_tuning/jobs/{job_id}/checkpoints?limit=100")
        listed = [c["step_number"] for c in body["data"]] if status == 200 else []
        listed_broken = [s for s in listed if not (folder / f"step-{s:06d}" / "state.pt")
                         .is_file() or any(b.startswith(f"step-{s:06d}") for b in broken)]
        return {"entries": entries, "unloadable_step_folders": broken,
                "listed_steps": listed, "listed_but_broken": listed_broken,
                "half_written_served": bool(broken or listed_broken)}

    # --- section: faults ------------------------------------------------------------------------
    def section_faults(self) -> dict:
        reference = self.ensure_reference()
        runs = []
        plan = [("a", self.fault_worker_kill), ("b", self.fault_checkpoint_write),
                ("c", self.fault_api_kill), ("d", self.fault_postgres),
                ("e", self.fault_storage_full), ("f", self.fault_corrupt_checkpoint)]
        wanted = set(self.args.only_faults or "abcdef")
        for repeat in range(1, self.args.repeats + 1):
            for letter, fault in plan:
                if letter not in wanted:
                    continue
                log(f"fault {letter}, repeat {repeat}")
                started = time.monotonic()
                try:
                    outcomes = fault(repeat)
                except Exception as exc:
                    traceback.print_exc()
                    outcomes = [{"fault": letter, "did": "the bench's own run broke",
                                 "bench_error": f"{exc.__class__.__name__}: {exc}"[:800]}]
                for outcome in outcomes:
                    outcome.update(repeat=repeat, seconds=round(time.monotonic() - started, 1))
                    runs.append(outcome)
                    log(f"  -> {outcome.get('ended')}; adapter equal: "
                        f"{(outcome.get('adapter') or {}).get('equal')}")
                try:  # the next fault starts from two live workers and a live API
                    if self.main.api_proc.poll() is not None:
                        self.main.start_api()
                    self.main.ensure_workers()
                    self.settle(self.main, 300)
                except Exception as exc:
                    log(f"restoring the deployment after fault {letter}: {exc}")
        return {"benchmark": "team-faults", "repeats": self.args.repeats,
                "lease_seconds": self.args.lease_seconds,
                "worker_hosts": [h or socket.gethostname() for h in self.hosts],
                "reference": reference, "runs": runs}

    def _start_fault_job(self, prefer: int | None = None) -> tuple[str, tuple[int, str]]:
        """Submits a fault job; with `prefer`, the other worker is stopped (SIGSTOP) until the
        preferred one has claimed it."""
        dep = self.main
        others = [p for i, p in enumerate(dep.workers) if prefer is not None and i != prefer
                  and p is not None and p.poll() is None]
        for proc in others:
            os.killpg(proc.pid, signal.SIGSTOP)
        try:
            job_id = dep.submit("team-a", self.fault_file, self.fault_spec())
            owner = wait_until(lambda: worker_of(dep.recent_events(job_id, 20)), 120,
                               f"{job_id} to start", 0.1)
        finally:
            for proc in others:
                os.killpg(proc.pid, signal.SIGCONT)
        return job_id, owner

    def _wait_checkpoints(self, job_id: str, count: int, beyond: int = 1,
                          timeout: float = 300) -> tuple[list[Path], int]:
        """Until `count` checkpoint folders exist and a training step beyond the newest one was
        reported; returns them and that step."""
        dep = self.main

        def ready():
            found = dep.checkpoints_on_disk(job_id)
            if len(found) < count:
                return None
            newest = int(found[-1].name.split("-")[1])
            step = latest_step(dep.recent_events(job_id, 5))
            return (found, step) if step and step >= newest + beyond else None
        return wait_until(ready, timeout, f"{job_id}: {count} checkpoint(s)", 0.05)

    def _finish_fault(self, letter: str, did: str, job_id: str, killed_index: int | None,
                      kill_at: float | None, extra: dict) -> dict:
        dep = self.main
        takeover_s = None
        if kill_at is not None:
            try:
                wait_until(lambda: any("attempt 2 of" in e["message"] for e in
                                       dep.recent_events(job_id, 30)), 120, "takeover", 0.1)
                takeover_s = round(time.monotonic() - kill_at, 2)
            except Timeout:
                pass
        if killed_index is not None:
            dep.start_worker(killed_index)
        outcome = self.job_outcome(dep, job_id, 600)
        sound = self.checkpoints_sound(dep, job_id)
        adapter = compare_adapters(Path(self.reference["adapter"]), dep.adapter(job_id))
        return {"fault": letter, "did": did, "job": job_id,
                "ended": f"{outcome['status']}" + (f" ({(outcome['error'] or {}).get('code')}: "
                                                   f"{(outcome['error'] or {}).get('message')})"
                                                   if outcome["error"] else ""),
                "attempts": outcome["events"]["attempts"], "takeover_s": takeover_s,
                "job_lost": outcome["status"] not in FINAL,
                "half_written_served": sound["half_written_served"],
                "user_error": (outcome["error"] or {}).get("message"),
                "adapter": adapter, "outcome": outcome, "checkpoints": sound, **extra}

    def fault_worker_kill(self, repeat: int) -> list[dict]:
        dep = self.main
        job_id, (pid, host) = self._start_fault_job(prefer=(repeat - 1) % 2)
        found, step = self._wait_checkpoints(job_id, 1, beyond=2)
        index = dep.worker_index(pid)
        kill_at = time.monotonic()
        dep.kill_worker(index)
        did = (f"SIGKILL worker {index} (host {host}, pid {pid}) at step ~{step}, checkpoints "
               f"on disk {[p.name for p in found]}")
        return [self._finish_fault("a", did, job_id, index, kill_at,
                                   {"killed_at_step": step})]

    def fault_checkpoint_write(self, repeat: int) -> list[dict]:
        """Kill the worker inside a checkpoint write: the moment its temp folder appears
        (inotify), the worker is stopped (SIGSTOP); odd repeats kill it there (the temp folder
        has no state.pt yet), even repeats let it run in slices (SIGCONT, SIGSTOP) until its
        state.pt has bytes, then kill it (a partly written checkpoint)."""
        dep = self.main
        into_state = repeat % 2 == 0
        job_id, (pid, host) = self._start_fault_job(prefer=repeat % 2)
        found, step = self._wait_checkpoints(job_id, 1, beyond=1)
        complete = (found[-1] / "state.pt").stat().st_size
        folder = dep.run_dir(job_id) / "checkpoints"
        index = dep.worker_index(pid)
        notify = Inotify()
        notify.watch(folder, Inotify.IN_CREATE)
        seen, kill_at, caught, missed = [], None, None, 0
        deadline = time.monotonic() + 120
        try:
            while time.monotonic() < deadline and kill_at is None and missed < 10:
                for where, mask, name in notify.read(1.0):
                    seen.append(f"{name}:{mask:#x}")
                    if not (name.startswith(".tmp-") and mask & Inotify.IN_CREATE):
                        continue
                    os.kill(pid, signal.SIGSTOP)
                    tmp = folder / name
                    state = tmp / "state.pt"
                    if into_state:  # slices of 0.1 ms, growing to 5 ms, until state.pt has bytes
                        slice_s, until = 1e-4, time.monotonic() + 10
                        while time.monotonic() < until:
                            if not tmp.exists() or (state.exists() and state.stat().st_size):
                                break
                            os.kill(pid, signal.SIGCONT)
                            time.sleep(slice_s)
                            os.kill(pid, signal.SIGSTOP)
                            slice_s = min(slice_s * 1.3, 5e-3)
                    if tmp.exists():
                        size = state.stat().st_size if state.exists() else None
                        os.kill(pid, signal.SIGKILL)
                        kill_at = time.monotonic()
                        caught = {"temp_folder": name, "state_pt_bytes_at_kill": size,
                                  "complete_state_pt_bytes": complete,
                                  "digest_written": (tmp / "state.sha256").exists()}
                        break
                    os.kill(pid, signal.SIGCONT)  # written and renamed already: the next one
                    missed += 1
                if kill_at is None and dep.job(job_id)["status"] in FINAL:
                    break
        finally:
            notify.close()
            if kill_at is None:
                os.kill(pid, signal.SIGCONT)
        if kill_at is None:
            return [{"fault": "b", "did": "no checkpoint write was caught to kill in",
                     "job": job_id, "ended": dep.job(job_id)["status"], "inotify": seen[-10:]}]
        dep.workers[index].wait(timeout=30)
        left = [{"name": p.name, "files": {f.name: f.stat().st_size for f in p.iterdir()}}
                for p in sorted(folder.iterdir()) if p.is_dir()]
        size = caught["state_pt_bytes_at_kill"]
        moment = (f"its state.pt had {size} of ~{complete} bytes" if size is not None
                  else "it had created the temp folder (no state.pt yet)")
        did = (f"SIGKILL worker {index} (host {host}) inside the checkpoint write after step "
               f"~{step}: {moment}")
        return [self._finish_fault("b", did, job_id, index, kill_at,
                                   {"caught": caught, "left_on_disk_after_kill": left})]

    def fault_api_kill(self, repeat: int) -> list[dict]:
        dep = self.main
        load = Load(dep, self.args.fault_clients, "chat", self.args.max_tokens,
                    stream_every=0, ft_every=0).start()
        job_id, _ = self._start_fault_job()
        time.sleep(3)
        small = self.work / "late.jsonl"
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:24]))
        late_file = dep.upload("team-b", small, "late.jsonl")
        late = dep.submit("team-b", late_file, job_spec(4, 2, epochs=1))
        late_status_at_kill = (dep.job(late) or {}).get("status")
        killed_at = time.monotonic()
        dep.kill_api(signal.SIGKILL)
        down = 3.0
        time.sleep(down)
        restart_s = dep.start_api()
        back_at = time.monotonic()
        time.sleep(10)
        load.stop()
        before = load.summary(where=lambda start, end: end < killed_at)
        in_flight = load.summary(where=lambda start, end: start < killed_at <= end)
        gap = load.summary(where=lambda start, end: killed_at <= start < back_at)
        after = load.summary(where=lambda start, end: start >= back_at)
        main_outcome = self._finish_fault("c", "", job_id, None, None, {})
        late_outcome = self.job_outcome(dep, late, 300)
        lost = self.lost_jobs(dep, [job_id, late])
        did = (f"SIGKILL of the API process group under {self.args.fault_clients} chat clients, "
               f"{down:.0f} s down, restarted (answering after {restart_s} s); a job was "
               f"training, another was {late_status_at_kill} when the API died")
        main_outcome.update(
            did=did, job_lost=bool(lost), lost=lost,
            ended=f"training job {main_outcome['ended']}; the job created just before the kill "
                  f"{late_outcome['status']}",
            user_error="; ".join(f"{k}: {v}" for k, v in {**in_flight["error_samples"],
                                                          **gap["error_samples"]}.items())[:400],
            chat={"before (ended before the kill)": before, "in flight at the kill": in_flight,
                  "sent while down or restarting": gap, "sent after it answered again": after},
            late_job=late_outcome, api_restart_s=restart_s)
        return [main_outcome]

    def fault_postgres(self, repeat: int) -> list[dict]:
        out = []
        for how in ("restart", "kill+start"):
            dep = self.main
            chat = Load(dep, self.args.fault_clients, "chat", self.args.max_tokens,
                        stream_every=0, ft_every=0).start()
            db = Load(dep, 4, "db").start()
            job_id, _ = self._start_fault_job()
            self._wait_checkpoints(job_id, 1, beyond=1)
            time.sleep(1)
            at = time.monotonic()
            if how == "restart":
                self.pg.restart()
            else:  # down for longer than a lease: the job's lease runs out meanwhile
                self.pg.kill()
                time.sleep(self.args.pg_down_seconds)
                self.pg.start(self.pg.folder)
            outage_s = round(time.monotonic() - at, 2)
            back = time.monotonic()
            time.sleep(10)
            chat.stop()
            db.stop()
            result = self._finish_fault("d", "", job_id, None, None, {})
            def overlapping(start, end):  # requests the outage could have touched
                return start < back and end >= at
            gap_chat = chat.summary(where=overlapping)
            gap_db = db.summary(where=overlapping)
            result.update(
                did=f"PostgreSQL {how} (down {outage_s} s) under {self.args.fault_clients} chat "
                    f"clients, 4 database-bound clients and a training job",
                postgres=how, outage_s=outage_s,
                chat={"whole": chat.summary(), "around_outage": gap_chat},
                db_requests={"whole": db.summary(), "around_outage": gap_db},
                user_error="; ".join(f"{k}: {v}" for k, v in
                                     {**gap_chat["error_samples"],
                                      **gap_db["error_samples"]}.items())[:400] or None,
                errors_5xx=chat.summary()["errors_5xx"] + db.summary()["errors_5xx"])
            out.append(result)
            self.settle(dep, 300)
        return out


    # --- (f) corrupted checkpoint ------------------------------------------------------------
    def fault_corrupt_checkpoint(self, repeat: int) -> list[dict]:
        dep = self.main
        truncate = repeat % 2 == 1
        job_id, (pid, host) = self._start_fault_job(prefer=(repeat - 1) % 2)
        found, step = self._wait_checkpoints(job_id, 2, beyond=2)
        index = dep.worker_index(pid)
        kill_at = time.monotonic()
        dep.kill_worker(index)
        newest = dep.checkpoints_on_disk(job_id)[-1]
        target = newest / "state.pt"
        size = target.stat().st_size
        if truncate:
            with open(target, "r+b") as handle:
                handle.truncate(size // 2)
            how = f"truncated {newest.name}/state.pt from {size} to {size // 2} bytes"
        else:
            noise = random.Random(repeat).randbytes(min(4096, size // 4))
            with open(target, "r+b") as handle:
                handle.seek(size // 2)
                handle.write(noise)
            how = f"overwrote {len(noise)} bytes in the middle of {newest.name}/state.pt"
        did = (f"SIGKILL worker {index} (host {host}) at step ~{step}, then {how}; the other "
               f"worker takes over")
        result = self._finish_fault("f", did, job_id, index, kill_at,
                                    {"corrupted": newest.name, "corruption": how})
        events = dep.events(job_id)
        result["what_happened"] = [e["message"] for e in events if e["level"] in ("warn", "error")
                                   or "resumed from" in e["message"]
                                   or "attempt" in e["message"]][:10]
        return result and [result]
