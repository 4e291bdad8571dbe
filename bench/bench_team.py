"""The team service under load, faults and cross-project attempts: `afinar serve --no-worker` and
two `afinar worker` processes sharing a real PostgreSQL (tests/postgres.py) and a state folder.

    .venv/bin/python bench/bench_team.py                          # all sections, 10 min load
    .venv/bin/python bench/bench_team.py load --minutes 3
    .venv/bin/python bench/bench_team.py faults --repeats 1
    .venv/bin/python bench/bench_team.py --smoke --out /tmp/team  # does it still run? (fault a only)
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
import collections
import ctypes
import ctypes.util
import datetime
import http.client
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import _smoke  # noqa: E402

AFINAR = str(Path(sys.executable).parent / "afinar")
DATA = ROOT / "examples" / "ticket-routing" / "data.jsonl"
KEYS = {"team-a": "sk-team-a-" + uuid.uuid4().hex[:12], "team-b": "sk-team-b-" +
        uuid.uuid4().hex[:12], "team-c": "sk-team-c-" + uuid.uuid4().hex[:12]}
ADMIN = "sk-admin-" + uuid.uuid4().hex[:12]
OTHER_HOST = "bench-node-2"
FINAL = ("succeeded", "failed", "cancelled")
STEP = re.compile(r"^Step (\d+)/(\d+): training loss")
RUNNING = re.compile(r"^Fine-tuning job running \(attempt (\d+) of (\d+), worker ([^:]+):(\d+):")
CREATED = "New fine-tuned model created"
# Training settings of every job here (afinar's `settings` extension): no compile (tiny model),
# no replay set, no early stop, fp32 (no precision probe).
BASE_SETTINGS = {"precision": "fp32", "compile": False, "preserve": False,
                 "early_stopping_patience": None}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Timeout(Exception):
    pass


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    """check()'s first truthy value, or Timeout after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def cpu_flags() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    found = sorted(set(re.findall(r"amx_int8|avx512_bf16", text)))
    return " ".join(found) or "neither amx_int8 nor avx512_bf16"


def machine() -> dict:
    model = ""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("Model name")), "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "cpu_flags": cpu_flags(),
            "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def rss_mb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, TypeError):
        pass
    return None


# --- HTTP --------------------------------------------------------------------------------------

class Api:
    """Plain HTTP to one server with one key: (status, parsed JSON or bytes); status None when
    the connection failed (the text of the failure instead of a body)."""

    def __init__(self, base: str, key: str | None, project: str | None = None):
        self.base, self.key, self.project = base, key, project

    def call(self, method: str, path: str, body=None, headers: dict | None = None,
             timeout: float = 60):
        head = {**({"Authorization": f"Bearer {self.key}"} if self.key else {}),
                **({"OpenAI-Project": self.project} if self.project else {}), **(headers or {})}
        data = body
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            head.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=head)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _parse(response.read())
        except urllib.error.HTTPError as err:
            return err.code, _parse(err.read())
        except (OSError, http.client.HTTPException) as exc:
            return None, f"{exc.__class__.__name__}: {exc}"

    def get(self, path: str, **kw):
        return self.call("GET", path, **kw)

    def sdk(self, timeout: float = 60):
        from openai import OpenAI

        return OpenAI(base_url=self.base, api_key=self.key or "sk-none", max_retries=0,
                      timeout=timeout, project=self.project)


def _parse(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def error_code(body) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("code") or body["error"].get("type")
    return None


def error_message(body) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"].get("message")
    if isinstance(body, (bytes, str)):
        return (body.decode("utf-8", "replace") if isinstance(body, bytes) else body)[:300]
    return None


def multipart(fields: dict, file_field: str, filename: bytes, content: bytes,
              boundary: str = "benchboundary7MA4YWxkTrZu0gW") -> tuple[bytes, str]:
    """A multipart body built by hand, so that any file name (NUL, newline) goes out as is."""
    parts = []
    for name, value in fields.items():
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                     f"{value}\r\n".encode())
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{file_field}\"; "
                 f"filename=\"".encode() + filename + b"\"\r\nContent-Type: "
                 b"application/octet-stream\r\n\r\n" + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# --- the deployment ----------------------------------------------------------------------------

class Deployment:
    """One API (`afinar serve --no-worker`) and its workers (`afinar worker`), each in a process
    group of its own, sharing `database_url` and `state`."""

    def __init__(self, name: str, work: Path, logs: Path, model: str, url: str, state: Path,
                 home: Path, engine: str, lease: float, hostnames: list[str | None],
                 extra: dict | None = None):
        self.name, self.logs, self.state, self.home = name, logs, state, home
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.config = work / f"{name}-serve.yaml"
        self.settings = {
            "host": "127.0.0.1", "port": self.port, "database_url": url, "home": str(state),
            "projects": {"team-a": {"keys": [KEYS["team-a"]]},
                         "team-b": {"keys": [KEYS["team-b"]]},
                         "team-c": {"keys": [KEYS["team-c"]], "max_files": 3,
                                    "max_storage_mb": 0.5}},
            "admin_keys": [ADMIN], "lease_seconds": lease, "max_attempts": 3,
            "models": {"tiny": model}, "evaluate_jobs": False, "engine": engine,
            "max_upload_mb": 1, **(extra or {})}
        import yaml

        self.config.write_text(yaml.safe_dump(self.settings))
        self.env = {**os.environ, "AFINAR_HOME": str(home), "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        self.env.pop("AFINAR_DATABASE_URL", None)
        self.env.pop("AFINAR_API_KEYS", None)
        self.hostnames = hostnames
        self.api_proc: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = [None] * len(hostnames)
        self.pids: set[int] = set()  # every process started, for the stray-process check
        self.admin = Api(self.base, ADMIN)

    def key(self, project: str) -> Api:
        return Api(self.base, KEYS[project])

    def _spawn(self, cmd: list[str], logname: str) -> subprocess.Popen:
        out = open(self.logs / logname, "ab")
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, cwd=str(self.state.parent))
        out.close()
        self.pids.add(proc.pid)
        return proc

    def start_api(self, timeout: float = 120) -> float:
        """Starts the API; seconds until it answered."""
        started = time.monotonic()
        self.api_proc = self._spawn([AFINAR, "serve", "--config", str(self.config),
                                     "--no-worker"], f"{self.name}-api.log")
        def up():
            if self.api_proc.poll() is not None:
                raise RuntimeError(f"{self.name} API exited: " + self.tail("api"))
            return self.admin.get("/models", timeout=5)[0] == 200
        wait_until(up, timeout, f"{self.name} API start", 0.2)
        return round(time.monotonic() - started, 2)

    def start_worker(self, index: int, timeout: float = 120) -> None:
        cmd = [AFINAR, "worker", "--config", str(self.config)]
        host = self.hostnames[index]
        if host:
            cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', host, *cmd]
        logname = f"{self.name}-worker-{index}.log"
        size = (self.logs / logname).stat().st_size if (self.logs / logname).exists() else 0
        proc = self.workers[index] = self._spawn(cmd, logname)

        def up():
            if proc.poll() is not None:
                raise RuntimeError(f"worker {index} exited: " + self.tail(f"worker-{index}"))
            with open(self.logs / logname, "rb") as handle:
                handle.seek(size)
                return b"afinar worker " in handle.read()
        wait_until(up, timeout, f"{self.name} worker {index} start", 0.2)

    def log_sizes(self) -> dict[str, int]:
        sizes = {}
        for i in range(len(self.workers)):
            file = self.logs / f"{self.name}-worker-{i}.log"
            sizes[f"worker-{i}"] = file.stat().st_size if file.exists() else 0
        return sizes

    def since(self, sizes: dict[str, int]) -> str:
        """The workers' log output after `sizes` (log_sizes())."""
        out = []
        for which, offset in sizes.items():
            file = self.logs / f"{self.name}-{which}.log"
            if file.exists():
                with open(file, "rb") as handle:
                    handle.seek(offset)
                    out.append(handle.read().decode("utf-8", "replace"))
        return "\n".join(out)

    def tail(self, which: str, chars: int = 3000) -> str:
        file = self.logs / f"{self.name}-{which}.log"
        return file.read_text(errors="replace")[-chars:] if file.exists() else ""

    @staticmethod
    def _kill_group(proc: subprocess.Popen | None, sig: int, timeout: float = 30) -> None:
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)

    def kill_api(self, sig: int = signal.SIGKILL) -> None:
        self._kill_group(self.api_proc, sig)

    def kill_worker(self, index: int, sig: int = signal.SIGKILL) -> None:
        self._kill_group(self.workers[index], sig)

    def worker_index(self, pid: int) -> int | None:
        return next((i for i, p in enumerate(self.workers) if p is not None and p.pid == pid),
                    None)

    def ensure_workers(self) -> None:
        for i, proc in enumerate(self.workers):
            if proc is None or proc.poll() is not None:
                self.start_worker(i)

    def stop(self) -> None:
        for proc in [*self.workers, self.api_proc]:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in [*self.workers, self.api_proc]:
            self._kill_group(proc, signal.SIGKILL, timeout=20)

    # --- jobs ------------------------------------------------------------------------------
    def upload(self, project: str, path: Path, name: str | None = None) -> str:
        client = self.key(project).sdk()
        with open(path, "rb") as handle:
            return client.files.create(file=(name or path.name, handle.read()),
                                       purpose="fine-tune").id

    def submit(self, project: str, file_id: str, spec: dict) -> str:
        client = self.key(project).sdk()
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=file_id, seed=spec["seed"],
            hyperparameters=spec["hyperparameters"], extra_body={"settings": spec["settings"]})
        return job.id

    def job(self, job_id: str) -> dict | None:
        status, body = self.admin.get(f"/fine_tuning/jobs/{job_id}", timeout=30)
        return body if status == 200 else None

    def wait_job(self, job_id: str, timeout: float, statuses=FINAL) -> dict:
        holder = {}

        def done():
            job = self.job(job_id)
            holder["job"] = job
            return job if job and job["status"] in statuses else None
        try:
            return wait_until(done, timeout, f"job {job_id}", 0.3)
        except Timeout:
            return {**(holder.get("job") or {}), "timed_out": True}

    def events(self, job_id: str) -> list[dict]:
        """Every event of the job, oldest first."""
        out, after = [], None
        for _ in range(200):
            query = "?limit=1000" + (f"&after={after}" if after else "")
            status, body = self.admin.get(f"/fine_tuning/jobs/{job_id}/events{query}")
            if status != 200:
                raise RuntimeError(f"events of {job_id}: {status} {body}")
            out += body["data"]
            if not body["has_more"]:
                break
            after = body["last_id"]
        return out[::-1]

    def recent_events(self, job_id: str, limit: int = 10) -> list[dict]:
        status, body = self.admin.get(f"/fine_tuning/jobs/{job_id}/events?limit={limit}",
                                      timeout=10)
        return body["data"] if status == 200 else []

    def run_dir(self, job_id: str) -> Path:
        return self.state / "runs" / job_id

    def checkpoints_on_disk(self, job_id: str) -> list[Path]:
        folder = self.run_dir(job_id) / "checkpoints"
        return sorted(folder.glob("step-*")) if folder.is_dir() else []

    def adapter(self, job_id: str) -> Path:
        return self.run_dir(job_id) / "adapter" / "adapter_model.safetensors"


def job_spec(max_steps: int, save_steps: int, seed: int = 7, epochs: int = 50) -> dict:
    return {"seed": seed, "hyperparameters": {"n_epochs": epochs, "batch_size": 4},
            "settings": {**BASE_SETTINGS, "max_steps": max_steps, "save_steps": save_steps}}


def worker_of(events: list[dict], attempt: int | None = None) -> tuple[int, str] | None:
    """(pid, host) of the worker that ran `attempt` (default: the newest)."""
    found = None
    for event in events:
        match = RUNNING.match(event["message"])
        if match and (attempt is None or int(match.group(1)) == attempt):
            found = (int(match.group(4)), match.group(3))
    return found


def latest_step(events_newest_first: list[dict]) -> int | None:
    for event in events_newest_first:
        match = STEP.match(event["message"])
        if match:
            return int(match.group(1))
    return None


def check_events(events: list[dict]) -> dict:
    """Oldest-first events: created_at never decreases, training steps only go up within an
    attempt, one 'New fine-tuned model created', attempts in order."""
    times = [e["created_at"] for e in events]
    attempts, steps_ok, problems = [], True, []
    current: list[int] = []
    first_steps = []
    for event in events:
        message = event["message"]
        match = RUNNING.match(message)
        if match:
            attempts.append(int(match.group(1)))
            current = []
            continue
        step = STEP.match(message)
        if step:
            value = int(step.group(1))
            if not current:
                first_steps.append(value)
            if current and value <= current[-1]:
                steps_ok = False
                problems.append(f"step {value} after {current[-1]} in attempt "
                                f"{attempts[-1] if attempts else '?'}")
            current.append(value)
    time_ok = all(a <= b for a, b in zip(times, times[1:]))
    if not time_ok:
        problems.append("created_at went backwards")
    return {"created_at_ordered": time_ok, "steps_ordered_within_attempt": steps_ok,
            "attempts": attempts, "attempts_ordered": attempts == list(range(1, len(attempts) + 1)),
            "first_step_of_each_attempt": first_steps,
            "models_created": sum(CREATED in e["message"] for e in events),
            "completed_events": sum("successfully completed" in e["message"] for e in events),
            "problems": problems[:5]}


def compare_adapters(a: Path, b: Path) -> dict:
    if not (a.is_file() and b.is_file()):
        return {"compared": False, "why": f"missing: {[str(p) for p in (a, b) if not p.is_file()]}"}
    import torch
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    if first.keys() != second.keys():
        return {"compared": True, "equal": False, "why": "different tensor names"}
    equal = all(torch.equal(first[k], second[k]) for k in first)
    diff = max(((first[k].float() - second[k].float()).abs().max().item() for k in first),
               default=0.0)
    return {"compared": True, "equal": equal, "tensors": len(first), "max_abs_diff": diff}


# --- load generators ---------------------------------------------------------------------------

class Load:
    """Client threads hammering the API until stopped. kind 'chat': the openai client's chat
    completions (some streaming, some on a fine-tuned model when `models` names one); kind
    'db': requests answered from the database (file and job lists, a job)."""

    def __init__(self, dep: Deployment, clients: int, kind: str = "chat", max_tokens: int = 16,
                 models: dict | None = None, stream_every: int = 10, ft_every: int = 10):
        self.dep, self.clients, self.kind, self.max_tokens = dep, clients, kind, max_tokens
        self.models = models if models is not None else {}
        self.ft_every = ft_every
        self.streaming = {i for i in range(clients)
                          if stream_every and i % stream_every == stream_every // 2}
        self.stop_event = threading.Event()
        self.records: list[tuple] = []  # (start, end, client kind, outcome, tokens)
        self.samples: dict[str, str] = {}
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []

    def start(self) -> "Load":
        self.started = time.monotonic()
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self, timeout: float = 120) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self.stopped = time.monotonic()
        self.hung = sum(t.is_alive() for t in self.threads)

    def _note(self, start: float, kind: str, outcome, tokens: int = 0, text: str = "") -> None:
        with self.lock:
            self.records.append((start, time.monotonic(), kind, outcome, tokens))
            if outcome != "ok" and str(outcome) not in self.samples:
                self.samples[str(outcome)] = text[:300]

    def _run(self, i: int) -> None:
        import openai

        project = "team-a" if i % 2 == 0 else "team-b"
        api = self.dep.key(project)
        client = api.sdk(timeout=60)
        rng = random.Random(i)
        n = 0
        while not self.stop_event.is_set():
            n += 1
            start = time.monotonic()
            if self.kind == "db":
                path = rng.choice(["/files", "/fine_tuning/jobs?limit=5", "/models"])
                status, body = api.get(path, timeout=60)
                outcome = "ok" if status == 200 else ("connection" if status is None else status)
                self._note(start, "db", outcome, 0, str(error_message(body) or body))
                if status is None:
                    time.sleep(0.05)
                continue
            streaming = i in self.streaming
            model = "tiny"
            kind = "stream" if streaming else "base"
            if self.ft_every and i % self.ft_every == 0 and self.models.get(project):
                model, kind = self.models[project], "fine-tuned"
            messages = [{"role": "user", "content": f"Ticket {i}-{n}: my deploy fails with "
                         f"error {rng.randint(100, 999)}, what should I do?"}]
            try:
                if streaming:
                    tokens = 0
                    stream = client.chat.completions.create(
                        model=model, messages=messages, max_tokens=self.max_tokens, stream=True,
                        stream_options={"include_usage": True})
                    for chunk in stream:
                        if chunk.usage is not None:
                            tokens = chunk.usage.completion_tokens
                    self._note(start, kind, "ok", tokens)
                else:
                    answer = client.chat.completions.create(model=model, messages=messages,
                                                            max_tokens=self.max_tokens)
                    self._note(start, kind, "ok", answer.usage.completion_tokens)
            except openai.APIStatusError as exc:
                self._note(start, kind, exc.status_code, 0, str(exc))
            except openai.APITimeoutError as exc:
                self._note(start, kind, "timeout", 0, str(exc))
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc.__context__
                self._note(start, kind, "connection", 0, f"{exc} ({cause!r})")
                time.sleep(0.05)  # the server is away: do not spin
            except Exception as exc:  # an SSE error event, a broken stream...
                self._note(start, kind, exc.__class__.__name__, 0, str(exc))

    def summary(self, since: float | None = None, until: float | None = None,
                where=None) -> dict:
        """Requests started in [since, until), or those `where(start, end)` keeps."""
        with self.lock:
            if where is not None:
                records = [r for r in self.records if where(r[0], r[1])]
            else:
                records = [r for r in self.records if (since is None or r[0] >= since)
                           and (until is None or r[0] < until)]
        if where is not None and records:
            since, until = min(r[0] for r in records), max(r[1] for r in records)
        duration = (until or getattr(self, "stopped", time.monotonic())) - \
            (since or self.started)
        ok = [r for r in records if r[3] == "ok"]
        errors = collections.Counter(str(r[3]) for r in records if r[3] != "ok")
        by_kind = {}
        for kind in sorted({r[2] for r in records}):
            mine = [r for r in records if r[2] == kind]
            good = [r[1] - r[0] for r in mine if r[3] == "ok"]
            by_kind[kind] = {"requests": len(mine), "served": len(good),
                             "p50_s": pct(good, 0.5), "p99_s": pct(good, 0.99)}
        latencies = [r[1] - r[0] for r in ok]
        tokens = sum(r[4] for r in ok)
        return {"requests": len(records), "served": len(ok), "errors_by_status": dict(errors),
                "errors_5xx": sum(n for k, n in errors.items() if k.isdigit() and k >= "500"),
                "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99),
                "max_s": round(max(latencies), 3) if latencies else None,
                "seconds": round(duration, 1),
                "requests_per_s": round(len(ok) / duration, 2) if duration > 0 else None,
                "completion_tokens": tokens,
                "tokens_per_s": round(tokens / duration, 1) if duration > 0 else None,
                "by_kind": by_kind, "error_samples": dict(self.samples),
                "clients_still_running_at_stop": getattr(self, "hung", None)}


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


# --- the bench ---------------------------------------------------------------------------------

class Bench:
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

    # --- section: load --------------------------------------------------------------------------
    def section_load(self) -> dict:
        args, dep = self.args, self.main
        duration = args.minutes * 60
        small = self.work / "load-data.jsonl"
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:24]))
        files = {p: dep.upload(p, small, f"load-{p}.jsonl") for p in ("team-a", "team-b")}
        spec = job_spec(max_steps=4, save_steps=2, epochs=1)
        models: dict[str, str] = {}
        load = Load(dep, args.clients, "chat", args.max_tokens, models, stream_every=0).start()
        rss_start = rss_mb(dep.api_proc.pid)
        submitted: list[tuple[str, str, float]] = []
        submit_errors: list[str] = []
        stop = threading.Event()
        rng = random.Random(5)

        def submitter():
            n = 0
            while not stop.is_set():
                project = ("team-a", "team-b")[n % 2]
                try:
                    submitted.append((dep.submit(project, files[project], spec), project,
                                      time.monotonic()))
                except Exception as exc:
                    submit_errors.append(f"{exc.__class__.__name__}: {exc}"[:300])
                n += 1
                stop.wait(rng.uniform(20, 30))

        def monitor():  # the newest fine-tuned model of each project, for the chat clients
            while not stop.wait(2):
                for job_id, project, _ in list(submitted):
                    job = dep.job(job_id)
                    if job and job["status"] == "succeeded":
                        models[project] = job["fine_tuned_model"]

        threads = [threading.Thread(target=submitter, daemon=True),
                   threading.Thread(target=monitor, daemon=True)]
        for thread in threads:
            thread.start()
        log(f"load: {args.clients} chat clients for {duration:.0f} s, a job every 20-30 s")
        end = time.monotonic() + duration
        while time.monotonic() < end:
            time.sleep(min(30, max(0.1, end - time.monotonic())))
            s = load.summary()
            log(f"  {s['served']} served, errors {s['errors_by_status']}, p50 {s['p50_s']} s, "
                f"{len(submitted)} jobs submitted")
        stop.set()
        load.stop()
        rss_end = rss_mb(dep.api_proc.pid)
        chat = load.summary()
        for thread in threads:
            thread.join(timeout=30)
        log("load: waiting for the submitted jobs to finish")
        per_job = []
        deadline = time.monotonic() + 120 + 60 * len(submitted)
        for job_id, project, at in submitted:
            job = dep.wait_job(job_id, max(5, deadline - time.monotonic()))
            events = dep.events(job_id)
            checked = check_events(events)
            per_job.append({"job": job_id, "project": project, "status": job.get("status"),
                            "error": job.get("error"),
                            "seconds_from_submit_to_final": round(
                                (job.get("finished_at") or 0) - (job.get("created_at") or 0), 1)
                            if job.get("finished_at") else None, **checked})
        statuses = collections.Counter(j["status"] for j in per_job)
        exactly_once = bool(per_job) and all(j["status"] == "succeeded"
                                             and j["models_created"] == 1 for j in per_job)
        in_order = all(j["created_at_ordered"] and j["steps_ordered_within_attempt"]
                       and j["attempts"] == [1] for j in per_job)
        seconds = [j["seconds_from_submit_to_final"] for j in per_job
                   if j["seconds_from_submit_to_final"] is not None]
        probe = self.stream_probe() if args.stream_probe else None
        return {"benchmark": "team-load", "minutes": args.minutes, "clients": args.clients,
                "max_tokens": args.max_tokens, "chat": chat, "stream_probe": probe,
                "jobs": {"submitted": len(submitted), "succeeded": statuses.get("succeeded", 0),
                         "failed": statuses.get("failed", 0),
                         "other": {k: v for k, v in statuses.items()
                                   if k not in ("succeeded", "failed")},
                         "submit_errors": submit_errors,
                         "every_job_succeeded_exactly_once": exactly_once,
                         "events_in_order": in_order,
                         "submit_to_final_s": {"p50": pct(seconds, 0.5),
                                               "max": max(seconds) if seconds else None},
                         "per_job": per_job},
                "api_rss_mb": {"start": rss_start, "end": rss_end},
                "loadavg_end": [round(x, 2) for x in os.getloadavg()]}

    def stream_probe(self) -> dict:
        """`--clients` - 1 non-streaming chat clients and one streaming one for
        --stream-probe seconds: does the API still answer (GET /v1/models) during and after?
        A hung API is killed and started again, so that the run goes on."""
        dep, seconds = self.main, self.args.stream_probe
        clients = self.args.clients
        log(f"stream probe: {clients - 1} chat clients + 1 streaming for {seconds:.0f} s")
        load = Load(dep, clients, "chat", self.args.max_tokens, {}, stream_every=0, ft_every=0)
        load.streaming = {0}
        load.start()
        time.sleep(seconds)
        during = dep.admin.get("/models", timeout=10)[0]
        load.stop(timeout=120)
        result = load.summary()
        after = dep.admin.get("/models", timeout=10)[0]
        hung = after != 200
        restart = None
        if hung:
            log("stream probe: the API does not answer; killing and starting it again")
            dep.kill_api(signal.SIGKILL)
            restart = dep.start_api()
        return {"clients": clients - 1, "streaming_clients": 1, "seconds": seconds,
                "chat": result, "models_status_during": during,
                "models_status_after_clients_stopped": after, "api_hung": hung,
                "api_restarted_in_s": restart}

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

    # --- section: security ----------------------------------------------------------------------
    def section_security(self) -> dict:
        dep = self.main
        a, b, c = dep.key("team-a"), dep.key("team-b"), dep.key("team-c")
        rows: list[dict] = []

        def row(attempt, expected, status, body, ok, note=""):
            got = f"{status} {error_code(body) or ''}".strip()
            if status is None and isinstance(body, str):  # no HTTP answer: say what happened
                note = (note + "; " if note else "") + body[:200]
            rows.append({"attempt": attempt, "expected": expected, "got": got,
                         "ok": bool(ok), **({"note": note} if note else {})})

        def expect(attempt, expected_codes, status, body, also=True, note=""):
            row(attempt, "/".join(map(str, expected_codes)), status, body,
                status in expected_codes and also, note)

        # team-a's objects: a file, a finished job (model, checkpoints, version), a rating,
        # a tag, an export, and a long job to cancel and pause.
        small = self.work / "sec-data.jsonl"
        small.write_text("".join(DATA.read_text().splitlines(keepends=True)[:24]))
        a_file = dep.upload("team-a", small, "a-private.jsonl")
        a_job = dep.submit("team-a", a_file, job_spec(4, 2, epochs=1))
        a_done = dep.wait_job(a_job, 300)
        a_model = a_done.get("fine_tuned_model")
        status, ck = a.get(f"/fine_tuning/jobs/{a_job}/checkpoints")
        a_ckpt = ck["data"][0]["fine_tuned_model_checkpoint"] if status == 200 and ck["data"] \
            else None
        version = self._version_of(dep, a, a_job)
        if version:
            a.call("POST", f"/registry/versions/{version}/tags", {"tag": "a-prod"})
        export = a.call("POST", f"/registry/versions/{version}/exports",
                        {"format": "merged"})[1] if version else None
        export_id = export.get("id") if isinstance(export, dict) else None
        rating = a.call("POST", "/ratings", {
            "messages": [{"role": "user", "content": "hola"}], "model_a": "tiny",
            "model_b": a_model or "tiny", "answer_a": "x", "answer_b": "y", "left": "a",
            "verdict": "a"})
        long_job = dep.submit("team-a", a_file, job_spec(100000, 1000, epochs=50))
        dep.wait_job(long_job, 120, statuses=("running",) + FINAL)
        b_file = dep.upload("team-b", small, "b-own.jsonl")

        client = b.sdk()
        import openai

        def sdk_try(attempt, expected, fn):
            try:
                fn()
                row(attempt, "/".join(map(str, expected)), 200, {}, False, "it worked")
            except openai.APIStatusError as exc:
                expect(attempt, expected, exc.status_code, exc.body if isinstance(exc.body, dict)
                       and "error" in exc.body else {"error": exc.body})
            except Exception as exc:
                row(attempt, "/".join(map(str, expected)), None, {}, False, repr(exc)[:200])

        # lists
        status, body = b.get("/files")
        ids = {f["id"] for f in body["data"]} if status == 200 else set()
        expect("team-b lists files", [200], status, body, a_file not in ids and b_file in ids,
               "team-a's file not in the list")
        status, body = b.get("/fine_tuning/jobs?limit=100")
        ids = {j["id"] for j in body["data"]} if status == 200 else set()
        expect("team-b lists jobs", [200], status, body, a_job not in ids and long_job not in ids)
        status, body = b.get("/models")
        ids = {m["id"] for m in body["data"]} if status == 200 else set()
        expect("team-b lists models", [200], status, body, a_model not in ids)
        status, body = b.get("/ratings")
        ids = {r["id"] for r in body.get("data", [])} if status == 200 else set()
        rating_id = rating[1].get("id") if isinstance(rating[1], dict) else None
        expect("team-b lists ratings", [200], status, body, rating_id not in ids,
               f"team-a's rating {'created' if rating_id else 'NOT created: ' + str(rating)}")
        status, body = b.get("/registry/versions")
        ids = {v["id"] for v in body.get("data", [])} if status == 200 else set()
        expect("team-b lists registry versions", [200], status, body, version not in ids)

        # team-a's objects by id
        for attempt, method, path, payload in [
            ("retrieve team-a's file", "GET", f"/files/{a_file}", None),
            ("download team-a's file", "GET", f"/files/{a_file}/content", None),
            ("validate team-a's file", "GET", f"/files/{a_file}/validation", None),
            ("retrieve team-a's job", "GET", f"/fine_tuning/jobs/{a_job}", None),
            ("list team-a's job events", "GET", f"/fine_tuning/jobs/{a_job}/events", None),
            ("stream team-a's job events", "GET", f"/fine_tuning/jobs/{a_job}/events/stream",
             None),
            ("list team-a's job checkpoints", "GET", f"/fine_tuning/jobs/{a_job}/checkpoints",
             None),
            ("read team-a's job config", "GET", f"/fine_tuning/jobs/{a_job}/config", None),
            ("cancel team-a's running job", "POST", f"/fine_tuning/jobs/{long_job}/cancel", None),
            ("pause team-a's running job", "POST", f"/fine_tuning/jobs/{long_job}/pause", None),
            ("resume team-a's job", "POST", f"/fine_tuning/jobs/{long_job}/resume", None),
            ("retrieve team-a's model", "GET", f"/models/{a_model}", None),
            ("retrieve team-a's checkpoint model", "GET", f"/models/{a_ckpt}", None),
            ("held-out prompts of team-a's job", "GET", f"/ratings/prompts?job={a_job}", None),
            ("retrieve team-a's registry version", "GET", f"/registry/versions/{version}", None),
            ("team-a's version's report", "GET", f"/registry/versions/{version}/report", None),
            ("export team-a's version", "POST", f"/registry/versions/{version}/exports",
             {"format": "merged"}),
            ("read team-a's export", "GET", f"/registry/exports/{export_id}", None),
            ("tag team-a's version", "POST", f"/registry/versions/{version}/tags",
             {"tag": "b-steals"}),
            ("remove team-a's tag", "DELETE", "/registry/tags/a-prod", None),
            ("compare with team-a's version", "GET",
             f"/registry/compare?versions={version},a-prod", None),
            ("delete team-a's file", "DELETE", f"/files/{a_file}", None),
            ("delete team-a's model", "DELETE", f"/models/{a_model}", None),
        ]:
            status, body = b.call(method, path, payload, timeout=30)
            expect(attempt, [404], status, body)

        # jobs and chat that would use team-a's objects
        sdk_try("create a job on team-a's training file", [400, 404], lambda:
                client.fine_tuning.jobs.create(model="tiny", training_file=a_file))
        sdk_try("create a job with team-a's validation file", [400, 404], lambda:
                client.fine_tuning.jobs.create(model="tiny", training_file=b_file,
                                               validation_file=a_file))
        sdk_try("fine-tune from team-a's fine-tuned model", [404], lambda:
                client.fine_tuning.jobs.create(model=a_model, training_file=b_file))
        sdk_try("fine-tune from team-a's checkpoint", [404], lambda:
                client.fine_tuning.jobs.create(model=a_ckpt, training_file=b_file))
        sdk_try("chat with team-a's fine-tuned model", [404], lambda:
                client.chat.completions.create(model=a_model, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}]))
        sdk_try("chat (stream) with team-a's fine-tuned model", [404], lambda: list(
                client.chat.completions.create(model=a_model, max_tokens=4, stream=True,
                                               messages=[{"role": "user", "content": "hi"}])))
        sdk_try("chat with team-a's checkpoint", [404], lambda:
                client.chat.completions.create(model=a_ckpt, max_tokens=4,
                                               messages=[{"role": "user", "content": "hi"}]))

        # nothing of team-a's changed
        still = a.get(f"/files/{a_file}")[0] == 200 and a.get(f"/models/{a_model}")[0] == 200
        long_status = (dep.job(long_job) or {}).get("status")
        tags = a.get(f"/registry/versions/{version}")[1] if version else {}
        row("team-a's file, model, running job and tag after all that", "all intact",
            200 if still else "changed", {}, still and long_status == "running"
            and "a-prod" in (tags.get("tags") or []) and "b-steals" not in (tags.get("tags") or []),
            f"job {long_status}, tags {tags.get('tags') if isinstance(tags, dict) else tags}")
        chat_a = a.call("POST", "/chat/completions", {"model": a_model, "max_tokens": 4,
                                                      "messages": [{"role": "user",
                                                                    "content": "hi"}]})
        expect("team-a chats with its own model", [200], chat_a[0], chat_a[1])
        a.call("POST", f"/fine_tuning/jobs/{long_job}/cancel")

        # a 404 for another project's object reads like one for no object at all
        st1, body1 = b.get(f"/files/{a_file}")
        fake = "file-" + "x" * 24
        st2, body2 = b.get(f"/files/{fake}")
        same = st1 == st2 and error_message(body1).replace(a_file, "ID") == \
            error_message(body2).replace(fake, "ID")
        row("404 for team-a's file vs for a file that never existed", "identical", st1, body1,
            same)

        # path-like upload names
        names = [b"../../etc/passwd", b"a/b/c.jsonl", b"..\\\\x.jsonl", b"..\\x.jsonl",
                 b"bad\x00name.jsonl", b"new\nline.jsonl", b"/abs/path.jsonl", b"",
                 "ñandú 🚀.jsonl".encode()]
        passwd = os.stat("/etc/passwd")
        before = set(p for p in dep.state.rglob("*"))
        uploads = []
        for name in names:
            body, ctype = multipart({"purpose": "fine-tune"}, "file", name, small.read_bytes())
            status, answer = b.call("POST", "/files", body, {"Content-Type": ctype})
            stored = answer.get("filename") if isinstance(answer, dict) and status == 200 \
                else None
            file_id = answer.get("id") if isinstance(answer, dict) and status == 200 else None
            where = dep.state / "files" / file_id if file_id else None
            lands = bool(where and where.is_file() and where.read_bytes() == small.read_bytes())
            uploads.append({"name": repr(name), "status": status, "stored_name": stored,
                            "lands_at_files_id": lands, "error": error_message(answer)
                            if status != 200 else None})
            safe = status != 200 or (lands and "/" not in stored and "\\" not in stored
                                     and "\0" not in stored and "\n" not in stored)
            row(f"upload named {name!r}", "200 stored as a plain name at STATE/files/<id> "
                "(or a 4xx)", status, answer, safe and (status is not None and status < 500),
                f"stored as {stored!r}")
        created = sorted(str(p.relative_to(dep.state)) for p in set(dep.state.rglob("*")) - before
                         if not str(p.relative_to(dep.state)).startswith(("files/file-", "runs/",
                                                                          "exports/")))
        after = os.stat("/etc/passwd")
        row("nothing written outside STATE/files/<id> by those uploads", "nothing",
            "nothing" if not created and passwd.st_mtime == after.st_mtime else "written", {},
            not created and passwd.st_mtime == after.st_mtime, ", ".join(created)[:200])

        # an upload over max_upload_mb (1 MB here), with and without Content-Length
        big = b'{"messages": []}\n' * (1_300_000 // 17)
        sdk_try("upload of 1.3 MB over max_upload_mb 1 (openai client)", [413], lambda:
                client.files.create(file=("big.jsonl", big), purpose="fine-tune"))
        body, ctype = multipart({"purpose": "fine-tune"}, "file", b"big.jsonl", big * 6)
        status, answer = b.call("POST", "/files", body, {"Content-Type": ctype})
        expect("upload of 7.8 MB with Python's urllib (sends the whole body, then reads)",
               [413], status, answer)
        body, ctype = multipart({"purpose": "fine-tune"}, "file", b"big.jsonl", big)
        status, answer = chunked_post(dep.base + "/files", body, ctype, KEYS["team-b"])
        expect("the same upload chunked (no Content-Length)", [413], status, answer)
        leftovers = [p.name for p in (dep.state / "files").iterdir()
                     if p.name.startswith(".upload-")]
        row("no temp files left by refused uploads", "none", "none" if not leftovers
            else "left", {}, not leftovers, ", ".join(leftovers))

        # malformed multipart bodies
        good, ctype = multipart({"purpose": "fine-tune"}, "file", b"x.jsonl", small.read_bytes())
        for attempt, payload, content_type in [
            ("multipart body of garbage", os.urandom(2000), ctype),
            ("multipart without a boundary", good, "multipart/form-data"),
            ("multipart cut off mid-part", good[: len(good) // 2], ctype),
            ("multipart without the file part",
             multipart({"purpose": "fine-tune"}, "other", b"x", b"y")[0], ctype),
            ("multipart with a wrong boundary", good.replace(b"benchboundary", b"otherboundar"),
             ctype),
            ("JSON instead of multipart", b'{"purpose": "fine-tune"}', "application/json"),
        ]:
            status, answer = b.call("POST", "/files", payload, {"Content-Type": content_type})
            expect(attempt, [400, 413, 415, 422], status, answer)

        # project quotas: team-c holds at most 3 files and 0.5 MB
        c_ids, statuses = [], []
        for i in range(4):
            body, ctype = multipart({"purpose": "fine-tune"}, "file", f"c{i}.jsonl".encode(),
                                    small.read_bytes())
            status, answer = c.call("POST", "/files", body, {"Content-Type": ctype})
            statuses.append(status)
            if status == 200:
                c_ids.append(answer["id"])
        expect("team-c's 4th file (max_files 3)", [429, 403, 413], statuses[-1], answer,
               statuses[:3] == [200, 200, 200], f"first three: {statuses[:3]}")
        for file_id in c_ids:
            c.call("DELETE", f"/files/{file_id}")
        body, ctype = multipart({"purpose": "fine-tune"}, "file", b"c-big.jsonl",
                                b"x" * 600_000)
        status, answer = c.call("POST", "/files", body, {"Content-Type": ctype})
        expect("team-c's 0.6 MB file (max_storage_mb 0.5)", [413], status, answer)

        # wrong keys
        wrong = wrong_keys(dep.port, self.args.wrong_keys)
        right = wrong_keys(dep.port, 100, key=KEYS["team-b"])
        row(f"{self.args.wrong_keys} requests with wrong keys", "all 401 invalid_api_key",
            ",".join(f"{k}x{v}" for k, v in wrong["statuses"].items()), {},
            wrong["statuses"] == {"401 invalid_api_key": self.args.wrong_keys},
            f"p50 {wrong['p50_ms']} ms, p99 {wrong['p99_ms']} ms per request "
            f"(a right key: p50 {right['p50_ms']} ms)")
        for attempt, header in [("no Authorization header", None), ("Basic auth", "Basic eDp5"),
                                ("Bearer with an empty key", "Bearer "),
                                ("team-a's key with a suffix", f"Bearer {KEYS['team-a']}x"),
                                ("team-a's key, a prefix of it", f"Bearer {KEYS['team-a'][:-1]}")]:
            status, answer = Api(dep.base, None).get(
                "/files", headers={"Authorization": header} if header else None)
            expect(attempt, [401], status, answer)

        # admin keys and the OpenAI-Project header
        status, body = dep.admin.get("/files")
        ids = {f["id"] for f in body["data"]} if status == 200 else set()
        expect("admin lists files", [200], status, body, a_file in ids and b_file in ids,
               "sees team-a's and team-b's")
        status, body = dep.admin.get("/fine_tuning/jobs?limit=100")
        ids = {j["id"] for j in body["data"]} if status == 200 else set()
        expect("admin lists jobs", [200], status, body, a_job in ids)
        status, body = dep.admin.get("/models")
        ids = {m["id"] for m in body["data"]} if status == 200 else set()
        expect("admin lists models", [200], status, body, a_model in ids)
        admin_b = Api(dep.base, ADMIN, project="team-b")
        status, body = admin_b.get("/files")
        ids = {f["id"] for f in body["data"]} if status == 200 else set()
        expect("admin with OpenAI-Project: team-b lists files", [200], status, body,
               a_file not in ids and b_file in ids, "only team-b's")
        status, body = admin_b.get(f"/files/{a_file}")
        expect("admin with OpenAI-Project: team-b reads team-a's file", [404], status, body)
        status, body = Api(dep.base, KEYS["team-b"], project="team-a").get("/files")
        expect("team-b's key with OpenAI-Project: team-a", [401, 403], status, body)
        status, body = Api(dep.base, KEYS["team-b"], project="team-b").get("/files")
        expect("team-b's key with OpenAI-Project: team-b", [200], status, body)
        status, body = Api(dep.base, KEYS["team-b"], project="nonexistent").get("/files")
        expect("team-b's key with OpenAI-Project: nonexistent", [401, 403], status, body)
        try:
            from openai import OpenAI
            sdk = OpenAI(base_url=dep.base, api_key=KEYS["team-b"], project="team-a",
                         max_retries=0)
            sdk.files.list()
            row("openai client with project='team-a' and team-b's key", "401", 200, {}, False)
        except openai.APIStatusError as exc:
            expect("openai client with project='team-a' and team-b's key", [401, 403],
                   exc.status_code, exc.body if isinstance(exc.body, dict) and "error" in exc.body
                   else {"error": exc.body})
        self.settle(dep, 120)
        passed = sum(r["ok"] for r in rows)
        return {"benchmark": "team-security", "rows": rows, "passed": passed,
                "failed": len(rows) - passed, "uploads": uploads, "wrong_keys": wrong,
                "right_key": right}


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


def chunked_post(url: str, body: bytes, ctype: str, key: str) -> tuple:
    """A POST with Transfer-Encoding: chunked (no Content-Length)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", ctype)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 65536):
            piece = body[i:i + 65536]
            conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        return response.status, _parse(response.read())
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{exc.__class__.__name__}: {exc}"
    finally:
        conn.close()


def wrong_keys(port: int, n: int, key: str | None = None) -> dict:
    """n GET /v1/models on one kept-alive connection, each with another wrong key (or `key`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    statuses, times = collections.Counter(), []
    for i in range(n):
        start = time.perf_counter()
        try:
            conn.request("GET", "/v1/models", headers={
                "Authorization": f"Bearer {key or 'sk-wrong-' + uuid.uuid4().hex}"})
            response = conn.getresponse()
            body = _parse(response.read())
            statuses[f"{response.status} {error_code(body) or ''}".strip()] += 1
        except (OSError, http.client.HTTPException) as exc:
            statuses[exc.__class__.__name__] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        times.append((time.perf_counter() - start) * 1000)
    conn.close()
    return {"requests": n, "statuses": dict(statuses), "p50_ms": pct(times, 0.5),
            "p99_ms": pct(times, 0.99), "mean_ms": round(sum(times) / len(times), 2)}


def stray_processes(work: str, pids: set[int]) -> dict:
    """`pgrep -af "afinar|postgres"`, and those of its lines that are this run's: its folder in
    the command line, or a process id it started (zombies are not counted)."""
    done = subprocess.run(["pgrep", "-af", "afinar|postgres"], capture_output=True, text=True,
                          timeout=30)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    ours = []
    for line in lines:
        pid = int(line.split()[0])
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if work in line or pid in pids:
            ours.append(line)
    return {"pgrep_lines": len(lines), "ours_still_running": ours}


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
