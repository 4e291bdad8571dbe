"""llama.cpp's own server (`llama-server`) as a child process: one per base model GGUF, with the
LoRA adapters of its fine-tunes loaded at start and chosen per request.

    server = LlamaServer(base_gguf, adapters=[lora_a, lora_b], slots=8)
    server.start()                                  # waits until /health answers
    server.complete(ids, n_predict=64, lora=0)      # {"tokens": [...], "stop_type": ...}
    for piece in server.stream(ids, 64, lora=1): ...
    server.close()

The binary is built from the same pinned llama.cpp source as the converter
(scripts/install_llama_cpp.sh); AFINAR_LLAMA_SERVER names another one. afinar sends token ids it
built with the model's own tokenizer and chat template, and reads token ids back, so prompts are
exactly the trained ones whatever llama.cpp's tokenizer would make of the text.

llama-server takes LoRA adapters only at start (`--lora`, `--lora-init-without-apply`: loaded
with scale 0); each request names the one it applies. Requests with different adapters are not
batched together (llama.cpp's rule), requests with the same one are, in parallel slots.

A child that dies is started again at the next request; the requests it was answering fail with
EngineUnavailable (the server turns it into a 503), never a hang: each request has a deadline.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx

from afinar.errors import AfinarError
from afinar.export.convert import converter_home
from afinar.export.llama_runner import use_repacked_weights

SERVER_ENV = "AFINAR_LLAMA_SERVER"
START_TIMEOUT_S = 120.0
INSTALL_HINT = ("run scripts/install_llama_cpp.sh from afinar's checkout (it builds llama-server "
                "from llama-cpp-python 0.3.36's llama.cpp source, once), set AFINAR_LLAMA_SERVER "
                "to a llama-server binary of that llama.cpp, or choose --engine transformers")


class EngineUnavailable(AfinarError):
    """The llama.cpp child could not answer (it died, or never started)."""


def server_binary() -> Path | None:
    chosen = os.environ.get(SERVER_ENV)
    path = Path(chosen).expanduser() if chosen else converter_home() / "bin" / "llama-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def require_server_binary() -> Path:
    path = server_binary()
    if path is None:
        raise AfinarError("the llama.cpp engine needs llama-server, which is not installed",
                          INSTALL_HINT)
    return path


def _die_with_parent() -> None:
    """In the child, before exec: Linux stops it when the process that started it dies (even
    by SIGKILL), so no llama-server outlives afinar."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def child_environment() -> dict[str, str]:
    """The environment for llama-server: afinar's OMP_WAIT_POLICY=PASSIVE (set for torch's
    threads, afinar/__init__.py) removed unless the user set it. llama.cpp's OpenMP threads meet
    at a barrier after every operation; sleeping there made batch-1 decode of the embedded model
    4x slower on 2 cores (20 vs 82 tokens/s with a LoRA adapter, 48 vs 110 without; measured
    with bench/bench_engines.py's direct server)."""
    env = dict(os.environ)
    if env.pop("AFINAR_SET_OMP_WAIT_POLICY", None):
        env.pop("OMP_WAIT_POLICY", None)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_threads() -> int:
    """Physical cores: llama.cpp's decode is bound by memory, hyper-threads only contend."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(logical or 1, physical or 1))


@dataclass
class LlamaServer:
    model: Path
    adapters: list[Path] = field(default_factory=list)
    slots: int = 8
    # Tokens of KV cache shared by all slots (llama.cpp's unified KV: one long conversation may
    # use it all). 0: 8,192, or 1,024 per slot when there are more than 8 slots.
    context: int = 0
    threads: int = 0  # 0: physical cores
    request_timeout_s: float = 600.0

    def __post_init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._client: httpx.Client | None = None
        self._log = None
        self.restarts = 0

    # --- the child ---------------------------------------------------------------------------
    def command(self, port: int) -> list[str]:
        args = [str(require_server_binary()), "--model", str(self.model),
                "--host", "127.0.0.1", "--port", str(port),
                "--parallel", str(self.slots), "--kv-unified",
                "--ctx-size", str(self.context or max(8192, 1024 * self.slots)),
                "--threads", str(self.threads or default_threads()),
                "--no-webui", "--no-warmup",
                "--log-verbosity", "2"]  # errors and warnings: what a failure report needs
        if not use_repacked_weights():
            args.append("--no-repack")
        for adapter in self.adapters:
            args += ["--lora", str(adapter)]
        if self.adapters:
            args.append("--lora-init-without-apply")
        return args

    def start(self) -> None:
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._process is not None:  # it died: start again, leaving nothing of it behind
            self.restarts += 1
            self._kill_locked()
        port = free_port()
        self._log = tempfile.NamedTemporaryFile(prefix="afinar-llama-server-", suffix=".log",
                                                delete=False)
        self._process = subprocess.Popen(self.command(port), stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=child_environment(),
                                         preexec_fn=_die_with_parent if sys.platform == "linux"
                                         else None)
        self._client = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                    timeout=self.request_timeout_s,
                                    limits=httpx.Limits(max_connections=4 * self.slots + 8))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EngineUnavailable(f"llama-server exited with code {self._process.returncode} "
                                        f"while loading {self.model.name}: {self.log_tail()}")
            try:
                if self._client.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self._kill_locked()
        raise EngineUnavailable(f"llama-server did not become ready within {START_TIMEOUT_S:.0f} s "
                                f"loading {self.model.name}: {self.log_tail()}")

    def log_tail(self, chars: int = 800) -> str:
        if self._log is None:
            return ""
        try:
            text = Path(self._log.name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:].strip()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _kill_locked(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._client is not None:
            self._client.close()
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None

    def close(self) -> None:
        with self._lock:
            self._kill_locked()
            self._process = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    # --- requests ----------------------------------------------------------------------------
    def _ready_client(self) -> httpx.Client:
        with self._lock:  # a dead child is started again for the next request
            self._start_locked()
            return self._client

    def _body(self, prompt_ids: list, n_predict: int, lora: int | None, temperature: float,
              top_p: float, seed: int | None, stop: list[str], stream: bool) -> dict:
        body = {"prompt": prompt_ids, "n_predict": n_predict, "temperature": temperature,
                "stop": stop,
                "top_p": top_p, "cache_prompt": True, "return_tokens": True, "stream": stream,
                # Every adapter's scale said (the unnamed ones are 0 anyway): the base is [].
                "lora": [{"id": i, "scale": 1.0 if i == lora else 0.0}
                         for i in range(len(self.adapters))]}
        if temperature <= 0:
            body["top_k"] = 1  # greedy; no sampler touches the argmax
        if seed is not None:
            body["seed"] = seed
        return body

    def _failed(self, exc: Exception) -> EngineUnavailable:
        process = self._process
        try:  # a connection cut by the child's death arrives a moment before its exit status
            if process is not None:
                process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        state = (f"died (exit status {process.returncode})" if not self.alive()
                 else f"did not answer ({str(exc).rstrip('.')})")
        failure = EngineUnavailable(f"llama-server ({self.model.name}) {state}; it is started "
                                    "again for the next request")
        failure.log_tail = self.log_tail(2000)  # for the server's log, not for API clients
        logging.getLogger("afinar.engines").warning("%s\n%s", failure.message, failure.log_tail)
        return failure

    def _post_completion(self, body: dict, timeout=httpx.USE_CLIENT_DEFAULT):
        """POST /completion; a child that died or did not answer, or a non-200 answer, is an
        EngineUnavailable."""
        client = self._ready_client()
        try:
            reply = client.post("/completion", json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None
        if reply.status_code != 200:
            raise EngineUnavailable(f"llama-server answered {reply.status_code}: "
                                    f"{reply.text[:300]}")
        return reply.json()

    def complete(self, prompt_ids: list[int], n_predict: int, lora: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | None = None) -> dict:
        """The generated token ids ("tokens") and llama.cpp's reason for stopping."""
        return self._post_completion(self._body(prompt_ids, n_predict, lora, temperature, top_p,
                                                seed, stop or [], False))

    def complete_many(self, prompts: list[list[int]], n_predict: int, lora: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                      stop: list[str] | None = None) -> list[dict]:
        """`complete` for several prompts in one request: llama-server queues them together, so
        which prompts share a batch, and so the answers, do not depend on when requests arrive
        (its slots are not batch-invariant: llama.cpp #6583, #7052)."""
        if len(prompts) == 1:
            return [self.complete(prompts[0], n_predict, lora, temperature, top_p, seed, stop)]
        body = self._body(prompts, n_predict, lora, temperature, top_p, seed, stop or [], False)
        # Each slot answers its share of the prompts one after another.
        timeout = self.request_timeout_s * math.ceil(len(prompts) / self.slots)
        results = sorted(self._post_completion(body, timeout), key=lambda r: r["index"])
        if len(results) != len(prompts):
            raise EngineUnavailable(f"llama-server answered {len(results)} of {len(prompts)} "
                                    "prompts")
        return results

    def stream(self, prompt_ids: list[int], n_predict: int, lora: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | None = None) -> Iterator[dict]:
        """llama.cpp's chunks as it produces them: "content" (text: llama-server holds a token
        back until its UTF-8 character is complete, and then sends the text without that
        token's id, so ids are not reliable here), and in the last one "stop": true with
        "tokens_predicted" and "stop_type" ("eos", "word", "limit")."""
        client = self._ready_client()
        body = self._body(prompt_ids, n_predict, lora, temperature, top_p, seed, stop or [], True)
        try:
            with client.stream("POST", "/completion", json=body) as reply:
                if reply.status_code != 200:
                    raise EngineUnavailable(f"llama-server answered {reply.status_code}")
                for line in reply.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    chunk = json.loads(line[6:])
                    yield chunk
                    if chunk.get("stop"):
                        return
        except httpx.HTTPError as exc:
            raise self._failed(exc) from None

