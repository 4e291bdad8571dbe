"""`afinar serve`: the OpenAI-compatible API (afinar.serve) under uvicorn; `afinar worker`: a
training worker for it, on this machine or another one sharing its database and state folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from afinar.cli.common import ENGINE_HELP, quiet_libraries
from afinar.console import console, user_errors

@user_errors
def serve(
    host: Optional[str] = typer.Option(None, help="Interface (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, help="Port (default 8000)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Server settings (YAML): "
                                          "api_keys, models, concurrent_jobs, max_upload_mb..."),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="Training jobs run at once."),
    engine: Optional[str] = typer.Option(None, "--engine", help=ENGINE_HELP + " Default: the "
                                         "settings' engine (auto)."),
    no_worker: bool = typer.Option(False, "--no-worker", help="Run the API alone: jobs wait "
                                   "for `afinar worker` processes (this or other machines)."),
):
    """OpenAI-compatible API: files, fine-tuning jobs, chat completions, models (/v1)."""
    quiet_libraries()
    import uvicorn

    from afinar.serve.app import create_app
    from afinar.serve.settings import LOOPBACK, load_serve_settings

    settings = load_serve_settings(config, host=host, port=port, concurrent_jobs=jobs,
                                   engine=engine)
    if settings.engine == "llamacpp":  # said now, not as a failed start-up inside uvicorn
        from afinar.engines import require_llama_cpp

        require_llama_cpp()
    if not settings.keys():
        if settings.host not in LOOPBACK:
            console.print(f"[yellow]no API keys configured: listening on 127.0.0.1 only, not "
                          f"{settings.host}[/] (set AFINAR_API_KEYS or api_keys to open it up)")
        else:
            console.print("[dim]no API keys configured: loopback only; any key is accepted[/]")
        settings = settings.model_copy(update={"host": "127.0.0.1"})
    from afinar.serve.database import database_url, describe
    from afinar.serve.store import Store

    Store(settings.state_dir(), settings.database_url).close()  # a bad URL: said here, plainly
    workers = ("no training workers: start `afinar worker`" if no_worker else
               f"{settings.concurrent_jobs} training worker"
               f"{'s' if settings.concurrent_jobs > 1 else ''}")
    database = describe(database_url(settings.database_url, settings.state_dir()))
    console.print(f"afinar serving OpenAI's API at http://{settings.host}:{settings.port}/v1 "
                  f"(state: {settings.state_dir()}, database: {database}, {workers}, engine: "
                  f"{settings.engine})")
    uvicorn.run(create_app(settings, str(config) if config else None, workers=not no_worker),
                host=settings.host, port=settings.port, log_level="warning")


@user_errors
def worker(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The server's settings "
                                          "(YAML): database_url, home, models, lease_seconds."),
    state: Optional[Path] = typer.Option(None, "--state", help="The server's state folder, as "
                                         "this machine mounts it (default: the settings' home)."),
    launcher: Optional[str] = typer.Option(None, "--launcher", help="Train each job in the "
                                           "processes this command starts, e.g. \"accelerate "
                                           "launch --num_processes 8\" or \"torchrun "
                                           "--nproc_per_node 8\" (this machine's GPUs)."),
):
    """Trains the server's queued jobs, one at a time: run one per GPU or machine. It shares the
    server's database (database_url / AFINAR_DATABASE_URL) and state folder; a job whose worker
    dies is taken over from its last checkpoint once its lease expires."""
    quiet_libraries()
    from afinar.serve.settings import load_serve_settings
    from afinar.serve.store import Store
    from afinar.serve.worker import serve_forever

    settings = load_serve_settings(config, home=str(state) if state else None,
                                   launcher=launcher)
    store = Store(settings.state_dir(), settings.database_url)
    try:
        serve_forever(store, settings)
    except KeyboardInterrupt:
        console.print("worker stopped; a job it was training continues from its last "
                      "checkpoint on the next worker")
