"""Server settings: a YAML file (`afinar serve --config serve.yaml`), AFINAR_API_KEYS, options.

    host: 127.0.0.1
    port: 8000
    api_keys: [sk-local-1]            # or AFINAR_API_KEYS=sk-a,sk-b; none: loopback only
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

from pydantic import Field

from afinar.config import EngineName, StrictModel, build_config, read_yaml
from afinar.models.registry import DEFAULT_MODEL
from afinar.paths import afinar_home

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ServeSettings(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Accepted bearer keys; also "
                                "AFINAR_API_KEYS (comma-separated). None: loopback only.")
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

    def state_dir(self) -> Path:
        return Path(self.home) if self.home else afinar_home() / "serve"

    def base_models(self) -> dict[str, str]:
        return {DEFAULT_MODEL: DEFAULT_MODEL, **self.models}

    def keys(self) -> list[str]:
        env = [k.strip() for k in os.environ.get("AFINAR_API_KEYS", "").split(",") if k.strip()]
        return self.api_keys + env

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
