"""Server settings: a YAML file (`afinar serve --config serve.yaml`), AFINAR_API_KEYS, options.

    host: 127.0.0.1
    port: 8000
    api_keys: [sk-local-1]            # or AFINAR_API_KEYS=sk-a,sk-b; none: loopback only
    projects:                         # keys of a team: they see only their project's objects
      team-a: {keys: [sk-a1, sk-a2], max_files: 500, max_storage_mb: 2048}
    admin_keys: [sk-admin]            # see every project (OpenAI-Project header: act in one)
    database_url: postgresql+psycopg://afinar@db/afinar   # or AFINAR_DATABASE_URL; default SQLite
    models: {tiny: ./models/tiny}     # base models offered besides the embedded default
    concurrent_jobs: 1                # training jobs run at once (one worker process each)
    max_upload_mb: 512
    adapter_cache: 8                  # fine-tuned adapters kept loaded for chat
    engine: auto                      # llamacpp | transformers | auto (llama.cpp on a CPU)
    llama_slots: 16                   # requests llama.cpp answers at once, per base model
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from afinar.config import EngineName, StrictModel, build_config, read_yaml
from afinar.models.registry import DEFAULT_MODEL
from afinar.paths import afinar_home

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ProjectSettings(StrictModel):
    keys: list[str] = Field(default_factory=list, description="Bearer keys of this project.")
    max_files: int = Field(1000, ge=1, description="Files the project may hold at once.")
    max_storage_mb: float = Field(10240, gt=0, description="Bytes of files it may hold, in MB.")


class ServeSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys; also "
                                "AFINAR_API_KEYS (comma-separated). None: loopback only.")
    projects: dict[str, ProjectSettings] = Field(
        default_factory=dict, description="Project name -> its keys and upload limits. A key "
        "sees, uses and deletes only its project's files, jobs, models and ratings; "
        "`api_keys` belong to the project 'default'.")
    admin_keys: list[str] = Field(default_factory=list, description="Keys that see every "
                                  "project; with an OpenAI-Project header, act inside one.")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the state database "
                                     "(also AFINAR_DATABASE_URL); default: SQLite in the state "
                                     "folder.")
    lease_seconds: float = Field(60, ge=2, description="How long a worker's claim on a job "
                                 "lasts without renewal; a worker renews it every third of "
                                 "that while it trains, and a job whose worker vanished is "
                                 "taken over once it expires.")
    max_attempts: int = Field(3, ge=1, description="Workers a job may be started on (lost "
                              "workers and crashes count) before it fails with the last error.")
    retry_seconds: float = Field(30, ge=0, description="How long a job whose attempt crashed "
                                 "waits before the next one, doubled at each further attempt, "
                                 "so a full disk or a machine's fault has time to clear instead "
                                 "of every attempt being spent in seconds.")
    launcher: str | None = Field(None, description="Runs each job in the processes this "
                                 "command starts (e.g. 'accelerate launch --config_file "
                                 "configs/accelerate/fsdp.yaml --num_processes 8' or "
                                 "'torchrun --nproc_per_node 8'); default: in the worker's own "
                                 "process. A worker's own --launcher wins.")
    organization: str = Field("afinar", description="The ORG part of ft:BASE:ORG:SUFFIX:ID.")
    models: dict[str, str] = Field(default_factory=dict, description="Base model name -> model "
                                   "(registry name, folder, .gguf or hub id).")
    concurrent_jobs: int = Field(1, ge=1, description="Training jobs that run at the same time.")
    max_upload_mb: float = Field(512, gt=0, description="Largest accepted upload.")
    adapter_cache: int = Field(8, ge=1, description="Fine-tuned adapters kept in memory.")
    engine: EngineName = Field(
        "auto", description="What answers chat: llamacpp (one llama-server child per base "
        "model, fine-tunes as LoRA adapters chosen per request), transformers, or auto "
        "(llama.cpp on a CPU when installed; transformers for a model it cannot run).")
    llama_slots: int = Field(16, ge=1, le=256, description="Requests llama.cpp answers at "
                             "once per base model (parallel slots, continuously batched).")
    held_out_fraction: float = Field(0.2, ge=0, lt=1, description="Held out from the training "
                                     "file when a job has no validation_file (0: train on all).")
    evaluate_jobs: bool = Field(True, description="Run afinar's evaluation when a job ends.")
    home: str | None = Field(None, description="State folder; default AFINAR_HOME/serve.")

    @model_validator(mode="after")
    def _one_owner_per_key(self):
        seen: dict[str, str] = {}
        owners = [("api_keys", k) for k in self.api_keys] + [("admin_keys", k) for k in
                                                             self.admin_keys]
        owners += [(f"projects.{name}.keys", k) for name, p in self.projects.items()
                   for k in p.keys]
        for where, key in owners:
            if key in seen and seen[key] != where:
                raise ValueError(f"a key is listed in both {seen[key]} and {where}; each key "
                                 "belongs to one project (or is an admin key)")
            seen[key] = where
        return self

    def state_dir(self) -> Path:
        return Path(self.home) if self.home else afinar_home() / "serve"

    def base_models(self) -> dict[str, str]:
        return {DEFAULT_MODEL: DEFAULT_MODEL, **self.models}

    def keys(self) -> list[str]:
        """Every accepted key (empty: no keys configured, loopback only)."""
        return list(self.key_projects())

    def key_projects(self) -> dict[str, str | None]:
        """Key -> its project; None for an admin key (every project)."""
        env = [k.strip() for k in os.environ.get("AFINAR_API_KEYS", "").split(",") if k.strip()]
        out: dict[str, str | None] = {key: "default" for key in self.api_keys + env}
        for name, project in self.projects.items():
            out.update({key: name for key in project.keys})
        out.update({key: None for key in self.admin_keys})
        return out

    def project_limits(self, name: str) -> ProjectSettings:
        return self.projects.get(name) or ProjectSettings()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def load_serve_settings(path: str | Path | None = None, **values) -> ServeSettings:
    data = read_yaml(path) if path else {}
    if path and data.get("models"):  # model folders are relative to the config file
        base = Path(path).parent
        data["models"] = {name: str(base / spec) if (base / spec).exists() else spec
                          for name, spec in data["models"].items()}
    data.update({k: v for k, v in values.items() if v is not None})
    return build_config(ServeSettings, data, str(path) if path else "command line",
                        "see `afinar serve --help`")
