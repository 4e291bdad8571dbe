"""The FastAPI application and the worker processes that train its jobs.

    app = create_app(load_serve_settings("serve.yaml"))     # uvicorn.run(app, ...)

On start-up: the state folder and database are opened (and migrated), jobs still validating
are validated again, and `concurrent_jobs` worker processes are started, unless `workers=False`
(`afinar serve --no-worker`: workers run elsewhere, `afinar worker`). On shutdown the workers
are stopped; a job they were training continues from its last checkpoint, on whichever worker
claims it next.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request

from afinar.serve import jobs as job_ops
from afinar.serve.engine import Engine
from afinar.serve.errors import envelope, install_handlers
from afinar.serve.routers import chat, files, jobs, models, ratings, registry
from afinar.serve.routers.deps import check_api_key
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store
from afinar.serve.web import pages


_FORM_SLACK = 64 * 1024  # multipart boundaries and the other form fields
_DRAIN_BYTES = 64 * 2**20  # of an oversized upload, read and dropped before its 413


def start_workers(settings: ServeSettings, config_path: str | None = None) -> list:
    import os

    state = settings.state_dir()
    procs = []
    for index in range(settings.concurrent_jobs):
        log = open(state / f"worker-{index}.log", "ab")
        cmd = [sys.executable, "-m", "afinar.serve.worker", "--state", str(state),
               "--parent", str(os.getpid())]
        if config_path:
            cmd += ["--config", str(config_path)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    return procs


def stop_workers(procs: list, timeout: float = 10) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def create_app(settings: ServeSettings, config_path: str | None = None,
               workers: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = Store(settings.state_dir(), settings.database_url)
        app.state.settings, app.state.store = settings, store
        app.state.engine = Engine(settings, store)
        for job in store.jobs_in("validating_files"):
            threading.Thread(target=job_ops.validate_files, args=(store, job["id"]),
                             daemon=True).start()
        procs = start_workers(settings, config_path) if workers else []
        try:
            yield
        finally:
            stop_workers(procs)
            app.state.engine.close()
            store.close()

    app = FastAPI(title="afinar", version="0.1.0", lifespan=lifespan,
                  dependencies=[Depends(check_api_key)],
                  description="OpenAI-compatible files, fine-tuning jobs, chat and models.")
    install_handlers(app)

    @app.middleware("http")
    async def _upload_size(request: Request, call_next):
        # Refuse an oversized upload from its Content-Length, before its body is read and
        # spooled to disk; the files router counts the bytes too (chunked uploads have none).
        length = request.headers.get("content-length", "")
        if (request.method == "POST" and request.url.path.rstrip("/") == "/v1/files"
                and length.isdigit() and int(length) > settings.max_upload_bytes + _FORM_SLACK):
            # Read (and drop) what the client sends before answering, up to _DRAIN_BYTES: a
            # client that reads the answer only after sending its whole body (Python's urllib)
            # would otherwise see its connection reset instead of the 413.
            drained = 0
            async for chunk in request.stream():
                drained += len(chunk)
                if drained > _DRAIN_BYTES:
                    break
            return envelope(413, f"File is too large: the limit is {settings.max_upload_mb:g} "
                            "MB (max_upload_mb in the server settings).", param="file",
                            code="file_too_large")
        return await call_next(request)

    for router in (files.router, jobs.router, chat.router, models.router, registry.router,
                   ratings.router, pages.router):
        app.include_router(router)
    return app
