"""`afinar serve`: the OpenAI-compatible API (afinar.serve) under uvicorn."""

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
    console.print(f"afinar serving OpenAI's API at http://{settings.host}:{settings.port}/v1 "
                  f"(state: {settings.state_dir()}, {settings.concurrent_jobs} training worker"
                  f"{'s' if settings.concurrent_jobs > 1 else ''}, engine: {settings.engine})")
    uvicorn.run(create_app(settings, str(config) if config else None), host=settings.host,
                port=settings.port, log_level="warning")
