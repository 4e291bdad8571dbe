"""The team service under load, faults and cross-project attempts: `afinar serve --no-worker` and
two `afinar worker` processes sharing a real PostgreSQL (tests/postgres.py) and a state folder.

    .venv/bin/python bench/bench_team.py                          # all sections, 10 min load
    .venv/bin/python bench/bench_team.py load --minutes 3
    .venv/bin/python bench/bench_team.py faults --repeats 1
    .venv/bin/python bench/bench_team.py --smoke --out /tmp/team  # still runs? (fault a)
    .venv/bin/python bench/bench_team.py --smoke --out /tmp/r.json --model DIR   # one file

Sections (`load`, `faults`, `security`, `all`; default all), each written to OUT/team-SECTION.json
(`--out` a folder, default bench/results; a path ending in .json gets every section in one file)
and printed as markdown tables:

- load: `--clients` (50) chat threads with the real `openai` client (max_retries=0, short
  answers; one in ten asks its project's newest fine-tuned model once there is one) for
  `--minutes`, while a job is submitted every 20-30 s (a few steps, alternating projects) for the
  two workers. Requests, errors by status, p50/p99 latency, chat tokens/s; jobs submitted /
  succeeded / failed, each succeeded exactly once, events in order. Then a stream probe
  (`--stream-probe` s): 49 non-streaming clients and one streaming; does the API still answer?
  (It deadlocked before commit b80846f; a hung API is killed and restarted so the run goes on.)
- faults, each `--repeats` times, against a reference job trained without a fault first (same
  data, seed, hyperparameters): (a) SIGKILL of the training worker mid-training after its first
  checkpoint, (b) SIGKILL while a checkpoint is being written (inotify on the checkpoints folder),
  (c) SIGKILL of the API under chat load, then a restart, (d) PostgreSQL restarted, and killed and
  started, under chat load and a running job, (e) the state folder's filesystem full (a small
  tmpfs, else a loop-mounted ext4 file): upload, a job's checkpoint write, an export; then space
  freed, (f) the newest checkpoint corrupted while its worker is dead.
- security: team-b's key against team-a's files, jobs, models, checkpoints, events, registry
  versions and ratings; path-like upload names; oversized and malformed uploads; quotas; 1,000
  wrong keys; admin keys and the OpenAI-Project header.

Worker 0 runs under this machine's host name, worker 1 in a UTS namespace of its own (host name
`bench-node-2`, `unshare --uts`; `--same-host` turns that off): a worker takes over a dead
worker's job on its own host at once (it sees the process is gone), another host's only once the
lease has run out, as across machines. Chat is answered by the transformers engine
(`--engine`). Every process runs in a process group of its own, logs under OUT/team-logs
(`--logs`); everything is stopped at the end and stray processes are looked for. Every wait has
a timeout; the whole run has one too. Numbers are for reading, never for assertions; the
machine is 2 cores and often shared (load averages are recorded).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import _smoke  # noqa: E402
from _team_deploy import (FINAL, OTHER_HOST, Api, Deployment, Timeout, log, machine,  # noqa: E402
                          stray_processes, wait_until)
from _team_faults import FaultsSection  # noqa: E402
from _team_load import LoadSection  # noqa: E402
from _team_security import SecuritySection  # noqa: E402
from _team_storage import StorageFullFault  # noqa: E402


# --- the bench ---------------------------------------------------------------------------------

class Bench(LoadSection, FaultsSection, StorageFullFault, SecuritySection):
    """The run's state (PostgreSQL, the deployments, the work folder), its set-up and tear-down
    and the helpers its sections share; the sections (section_load, section_faults,
    section_security) and the faults come from the mixins in bench/_team_*.py."""

    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.work = Path(tempfile.mkdtemp(prefix="afinar-team-", dir="/tmp"))
        os.chmod(self.work, 0o755)  # PostgreSQL runs as `postgres` and must enter it
        self.logs = Path(args.logs)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pg = None
        self.main: Deployment | None = None
        self.small: Deployment | None = None
        self.mounted: Path | None = None
        self.results: dict[str, dict] = {}
        self.reference: dict | None = None
        self.fault_file: str | None = None
        self.torn_down = False

    # --- set-up and tear-down -----------------------------------------------------------------
    def setup(self) -> None:
        from postgres import LocalPostgres

        started = time.monotonic()
        self.pg = LocalPostgres().start(self.work / "pg")
        self.url = self.pg.create_database("team")
        log(f"PostgreSQL at {self.pg.url} (database team)")
        self.model = self.args.model or str(_smoke.build_model(self.work / "model"))
        hosts = [None, None if self.args.same_host else OTHER_HOST]
        if hosts[1] and subprocess.run(["unshare", "--uts", "true"],
                                       capture_output=True).returncode != 0:
            log("unshare --uts is not allowed here: both workers run under this host name")
            hosts[1] = None
        self.hosts = hosts
        state = self.work / "main" / "state"
        state.mkdir(parents=True)
        self.main = Deployment("main", self.work, self.logs, self.model, self.url, state,
                               self.work / "main" / "home", self.args.engine,
                               self.args.lease_seconds, hosts)
        self.main.start_api()
        for i in range(len(hosts)):
            self.main.start_worker(i)
        self.setup_s = round(time.monotonic() - started, 1)
        log(f"main deployment up at {self.main.base} ({self.setup_s} s); workers on hosts "
            f"{[h or socket.gethostname() for h in hosts]}")

    def teardown(self) -> dict:
        if self.torn_down:
            return {}
        self.torn_down = True
        pids = set()
        for dep in (self.small, self.main):
            if dep is not None:
                pids |= dep.pids
                try:
                    dep.stop()
                except Exception as exc:  # keep tearing down
                    log(f"stopping {dep.name}: {exc}")
        postmaster = None
        if self.pg is not None:
            try:
                postmaster = int((self.pg.folder / "data" / "postmaster.pid").read_text()
                                 .split()[0])
            except (OSError, ValueError):
                pass
            try:
                shutil.copy(self.pg.folder / "postgres.log", self.logs / "postgres.log")
            except OSError:
                pass
            try:
                self.pg.stop()
            except Exception as exc:
                log(f"stopping PostgreSQL: {exc}")
        for dep in (self.main, self.small):
            if dep is not None and (dep.state / "exports").is_dir():  # for a look
                for file in (dep.state / "exports").glob("*.log"):
                    shutil.copy(file, self.logs / f"{dep.name}-{file.name}")
        if self.mounted is not None:
            subprocess.run(["umount", "-l", str(self.mounted)], capture_output=True, timeout=60)
        time.sleep(1)
        strays = stray_processes(str(self.work), pids | ({postmaster} if postmaster else set()))
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        return strays

    # --- helpers ------------------------------------------------------------------------------
    def settle(self, dep: Deployment, timeout: float = 300) -> None:
        """Waits until no job of `dep` is queued, running or validating."""
        def idle():
            status, body = dep.admin.get("/fine_tuning/jobs?limit=100")
            return status == 200 and not any(j["status"] not in FINAL + ("paused",)
                                             for j in body["data"])
        try:
            wait_until(idle, timeout, "jobs to settle", 0.5)
        except Timeout as exc:
            log(str(exc))

    def _version_of(self, dep: Deployment, api: Api, job_id: str) -> str | None:
        def find():
            status, body = api.get("/registry/versions")
            if status != 200:
                return None
            return next((v["id"] for v in body["data"] if v.get("job") == job_id), None)
        try:
            return wait_until(find, 30, f"registry version of {job_id}", 0.5)
        except Timeout:
            return None


# --- output -------------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_load(r: dict) -> None:
    chat, jobs = r["chat"], r["jobs"]
    print(f"\n### load: {r['clients']} chat clients, {r['minutes']} min, max_tokens "
          f"{r['max_tokens']}\n")
    print(table(["requests", "served", "errors by status", "5xx", "p50 s", "p99 s",
                 "requests/s", "chat tokens/s"],
                [[chat["requests"], chat["served"], chat["errors_by_status"] or "none",
                  chat["errors_5xx"], chat["p50_s"], chat["p99_s"], chat["requests_per_s"],
                  chat["tokens_per_s"]]]))
    print()
    print(table(["client kind", "requests", "served", "p50 s", "p99 s"],
                [[k, v["requests"], v["served"], v["p50_s"], v["p99_s"]]
                 for k, v in chat["by_kind"].items()]))
    print()
    print(table(["jobs submitted", "succeeded", "failed", "other", "each succeeded exactly once",
                 "events in order", "submit → final p50 / max s"],
                [[jobs["submitted"], jobs["succeeded"], jobs["failed"], jobs["other"] or "-",
                  jobs["every_job_succeeded_exactly_once"], jobs["events_in_order"],
                  f"{jobs['submit_to_final_s']['p50']} / {jobs['submit_to_final_s']['max']}"]]))
    print(f"\nAPI RSS {r['api_rss_mb']['start']} → {r['api_rss_mb']['end']} MB")
    probe = r.get("stream_probe")
    if probe:
        c = probe["chat"]
        print(f"\nstream probe: {probe['clients']} non-streaming + {probe['streaming_clients']} "
              f"streaming client(s), {probe['seconds']:.0f} s\n")
        print(table(["requests", "served", "errors", "GET /v1/models during", "after the "
                     "clients stopped", "API hung (restarted)"],
                    [[c["requests"], c["served"], c["errors_by_status"] or "none",
                      probe["models_status_during"], probe["models_status_after_clients_stopped"],
                      f"{probe['api_hung']} ({probe['api_restarted_in_s']} s)"
                      if probe["api_hung"] else False]]))


def print_faults(r: dict) -> None:
    ref = r["reference"]
    print(f"\n### faults (lease {r['lease_seconds']} s, workers on hosts "
          f"{r['worker_hosts']}); reference job {ref['status']} in {ref['seconds']} s, "
          f"{ref['steps']} steps, checkpoint every {ref['save_steps']}\n")
    rows = []
    for run in r["runs"]:
        adapter = run.get("adapter") or {}
        same = ("=" if adapter.get("equal") else f"≠ (max {adapter.get('max_abs_diff'):.3g})"
                if adapter.get("compared") else "-")
        rows.append([f"{run['fault']}{' ' + run['part'] if run.get('part') else ''}",
                     run.get("repeat"), run.get("did", ""), run.get("ended", ""),
                     run.get("attempts", "-"), run.get("takeover_s", "-"),
                     run.get("job_lost", "-"), run.get("half_written_served", "-"), same,
                     (run.get("user_error") or "-")[:160], run.get("bench_error", "")])
    print(table(["fault", "rep", "what was done", "ended as", "attempts", "takeover s",
                 "job lost", "half-written served", "adapter vs reference",
                 "error the user saw", "bench error"], rows))
    chats = [(run["fault"], run["repeat"], run.get("postgres", "api kill"), f"{what} {k}", v)
             for run in r["runs"] for what in ("chat", "db_requests")
             for k, v in (run.get(what) or {}).items()]
    if chats:
        print()
        print(table(["fault", "rep", "what", "window", "requests", "served", "errors",
                     "5xx"], [[f, rep, what, window, s["requests"], s["served"],
                               s["errors_by_status"] or "none", s["errors_5xx"]]
                              for f, rep, what, window, s in chats]))


def print_security(r: dict) -> None:
    print(f"\n### security: {r['passed']} of {len(r['rows'])} as expected\n")
    print(table(["attempt", "expected", "got", "ok", "note"],
                [[x["attempt"], x["expected"], x["got"], "yes" if x["ok"] else "**NO**",
                  x.get("note", "")] for x in r["rows"]]))


def main() -> None:
    parser = argparse.ArgumentParser(description="The team service (afinar serve --no-worker, "
                                     "2 workers, PostgreSQL) under load, faults and "
                                     "cross-project attempts.")
    parser.add_argument("section", nargs="?", default="all",
                        choices=["all", "load", "faults", "security"])
    parser.add_argument("--minutes", type=float, help="load duration (default 10; --smoke: 1)")
    parser.add_argument("--repeats", type=int, help="fault repetitions (default 2; --smoke: 1)")
    parser.add_argument("--clients", type=int, default=50, help="chat threads in the load")
    parser.add_argument("--fault-clients", type=int, default=20,
                        help="chat threads during faults c and d")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--stream-probe", type=float, default=30,
                        help="seconds of the load's streaming probe (clients-1 non-streaming + 1 "
                        "streaming client); 0: no probe")
    parser.add_argument("--fault-steps", type=int, default=160,
                        help="steps of the fault jobs (and the reference)")
    parser.add_argument("--fault-save-steps", type=int, default=20)
    parser.add_argument("--lease-seconds", type=float, default=6)
    parser.add_argument("--wrong-keys", type=int, default=1000)
    parser.add_argument("--pg-down-seconds", type=float, default=8,
                        help="fault d: PostgreSQL killed, down this long, started (default 8: "
                        "longer than the lease)")
    parser.add_argument("--small-fs-mb", type=int, default=32,
                        help="size of the filesystem that fills up (fault e)")
    parser.add_argument("--only-faults", help="e.g. 'ab': only those faults")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "llamacpp",
                                                                      "auto"])
    parser.add_argument("--same-host", action="store_true",
                        help="both workers under this machine's host name")
    parser.add_argument("--model", help="a model folder (default: the tests' tiny random Llama)")
    parser.add_argument("--out", help="folder for team-*.json (default bench/results), or one "
                        ".json file for every section")
    parser.add_argument("--logs", help="server, worker and PostgreSQL logs (default: "
                        "OUT/team-logs)")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temporary folder (database, state) for a look")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results")
    args.minutes = args.minutes if args.minutes is not None else (0.25 if args.smoke else 10)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 2)
    if args.smoke:  # does it still run? (the test suite runs this): one fault, short load
        args.wrong_keys = min(args.wrong_keys, 100)
        args.stream_probe = min(args.stream_probe, 5)
        args.fault_steps = min(args.fault_steps, 60)
        args.only_faults = args.only_faults or "a"
    single = out.suffix == ".json"
    folder = out.parent if single else out
    folder.mkdir(parents=True, exist_ok=True)
    args.logs = args.logs or str(folder / (out.stem + "-logs" if single else "team-logs"))
    sections = ["load", "faults", "security"] if args.section == "all" else [args.section]

    bench = Bench(args)
    limit = 3600 + args.minutes * 60 + args.repeats * 1800
    stop_all = threading.Event()

    def watchdog():
        if not stop_all.wait(limit):
            log(f"the whole run passed its limit of {limit:.0f} s: tearing down")
            bench.teardown()
            os._exit(3)
    threading.Thread(target=watchdog, daemon=True).start()

    def on_signal(signum, frame):
        log(f"signal {signum}: tearing down")
        bench.teardown()
        os._exit(130)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    header = {"smoke": args.smoke, "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine(), "engine": args.engine, "database": "PostgreSQL (tests/"
              "postgres.py)", "model": args.model or "tests' tiny random Llama (bench/_smoke.py)",
              "lease_seconds": args.lease_seconds, "workers": 2}
    results: dict[str, dict] = {}
    strays: dict = {}
    try:
        bench.setup()
        header.update(setup_s=bench.setup_s, worker_hosts=[h or socket.gethostname()
                                                          for h in bench.hosts])
        for section in sections:
            log(f"section {section}")
            started = time.monotonic()
            try:
                result = getattr(bench, f"section_{section}")()
            except Exception as exc:
                traceback.print_exc()
                result = {"benchmark": f"team-{section}",
                          "bench_error": f"{exc.__class__.__name__}: {exc}"[:2000]}
            result = {**header, **result, "section_seconds": round(time.monotonic() - started)}
            if section == "faults" and bench.small is not None:
                result["storage"] = bench.storage_note
            results[section] = result
            if not single:
                (folder / f"team-{section}.json").write_text(json.dumps(result, indent=2))
    finally:
        strays = bench.teardown()
        stop_all.set()
    for result in results.values():
        result["stray_processes_after_teardown"] = strays
        result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if single:
        out.write_text(json.dumps(results, indent=2))
    else:
        for section, result in results.items():
            (folder / f"team-{section}.json").write_text(json.dumps(result, indent=2))
    print(f"\nCPU flags: {header['machine']['cpu_flags']}; {header['machine']['cores']} cores; "
          f"engine {args.engine}; logs in {args.logs}")
    for section, result in results.items():
        if "bench_error" in result:
            print(f"\n### {section}: the bench broke: {result['bench_error']}")
            continue
        {"load": print_load, "faults": print_faults, "security": print_security}[section](result)
    print(f"\nstray processes after tear-down: {strays.get('ours_still_running') or 'none'}")
    print(f"results: {out if single else [str(folder / f'team-{s}.json') for s in results]}")


if __name__ == "__main__":
    main()
