"""bench_team.py's deployment and its plumbing: the run's constants (keys, regexes, job
settings), small helpers (log, wait_until, free_port, pct, machine, rss_mb), plain HTTP (Api,
multipart, error helpers), the Deployment (an API and its workers, each in a process group of
its own), job specs and event checks (job_spec, check_events, compare_adapters) and the
stray-process check after tear-down.

bench/ is on sys.path (bench_team.py is run as a script from it and puts it there)."""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

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
            "admin_keys": [ADMIN], "lease_seconds": lease, "max_attempts": 3, "retry_seconds": 1,
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
