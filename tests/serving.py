"""Helpers and fixtures for the serve tests (test modules import them): a real `afinar serve`
(uvicorn on 127.0.0.1, worker processes, SQLite), driven with the real `openai` client, for what
needs the worker (jobs, checkpoints, fine-tuned models) or the process (signals, keys, ports);
and the same app in-process (`in_process`: FastAPI's test client, no workers) for what the web
process does alone (files, chat). The tiny random Llama from tests/conftest.py is offered as the
base model "tiny"."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import urllib.error
import urllib.request

import pytest
import yaml

AFINAR = str(Path(sys.executable).parent / "afinar")


def raw(method: str, url: str, body: bytes | None = None, key: str | None = None,
        headers: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """A plain HTTP request (status, body), for what the SDK would not send."""
    request = urllib.request.Request(url, data=body, method=method, headers={
        **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    folder: Path
    config: Path
    port: int
    proc: subprocess.Popen | None = None

    def start(self, env: dict | None = None, timeout: float = 60,
              args: tuple[str, ...] = ()) -> "Server":
        log = open(self.folder / "server.log", "ab")
        environ = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen([AFINAR, "serve", "--config", str(self.config), "--port",
                                      str(self.port), *args], stdout=log,
                                     stderr=subprocess.STDOUT,
                                     env=environ, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "server.log").read_text()[-3000:])
            try:
                raw("GET", self.url + "/models", key=self.key or "x", timeout=2)
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("server did not start: " + (self.folder / "server.log").read_text())

    @property
    def key(self) -> str | None:
        keys = yaml.safe_load(self.config.read_text()).get("api_keys") or []
        return keys[0] if keys else None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # the web process and its workers
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a hung server must not outlive its test
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.proc = None

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key=self.key or "sk-anything", max_retries=0, **kw)


def make_server(folder: Path, tiny_model_dir: Path, **settings) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "serve.yaml"
    values = {"models": {"tiny": str(tiny_model_dir)}, "home": str(folder / "state"),
              "evaluate_jobs": False, **settings}
    config.write_text(yaml.safe_dump(values))
    return Server(f"http://127.0.0.1:{port}/v1", folder, config, port)


@dataclass
class InProcess:
    """The same app as `afinar serve`, without workers, called in this process through
    FastAPI's test client (an httpx client): no port, no second process, no start-up wait. For
    tests of what the web process does alone (files, validation, models, errors)."""
    folder: Path
    http: object  # fastapi.testclient.TestClient
    url: str = "http://testserver/v1"

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key="sk-anything", max_retries=0,
                      http_client=self.http, **kw)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
        response = self.http.request(method, self.url + path, content=body,
                                     headers=headers or {})
        return response.status_code, response.content


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_model_dir):
    """`server`'s settings (upload limit 0.05 MB), served in-process."""
    from fastapi.testclient import TestClient

    from afinar.serve.app import create_app
    from afinar.serve.settings import load_serve_settings

    folder = tmp_path_factory.mktemp("in-process")
    config = make_server(folder, tiny_model_dir, max_upload_mb=0.05).config
    app = create_app(load_serve_settings(config), str(config), workers=False)
    with TestClient(app) as http:  # runs the app's lifespan (its store), then closes it
        yield InProcess(folder, http)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = make_server(tmp_path_factory.mktemp("serve"), tiny_model_dir, max_upload_mb=0.05,
                      evaluate_jobs=True)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return server.client()


def chat_records(n: int = 40) -> list[dict]:
    return [{"messages": [
        {"role": "user", "content": f"pedido {i} llegó roto"},
        {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"}]}
        for i in range(n)]


def wait_for(client, job_id: str, statuses=("succeeded", "failed", "cancelled"),
             timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")
