"""The server's llama.cpp engine: one llama-server child per base model GGUF, every fine-tune of
that base as a LoRA adapter on it, chosen per request.

llama-server loads adapters only at start. When a model whose adapter the child lacks is asked
for, a new child starts with the adapters it had plus the new one (the most recent
`adapter_cache` of them), takes the new requests, and the old child is stopped once the requests
it was answering are done: no request is cut off by a swap. A QLoRA run answers from its own
de-quantised base (another child, shared by the runs of that base); an adapter llama.cpp cannot
apply (DoRA, ...) from the run's merged weights (a child of its own).

A child that dies is started again at the next request; requests it was answering get a 503
(EngineUnavailable, see Engine).
"""

from __future__ import annotations

import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from afinar.engines import tokenizer_and_stops
from afinar.engines.gguf_cache import (EngineFiles, adapter_gguf, checkpoint_adapter_folder,
                                       engine_files)
from afinar.engines.llama_server import LlamaServer
from afinar.engines.llamacpp import LlamaCppModel
from afinar.errors import AfinarError
from afinar.models.registry import resolve_model


@dataclass
class _Prepared:
    files: EngineFiles
    tokenizer: object
    stop_ids: list[int]
    resolved: object


@dataclass
class _Served:
    server: LlamaServer
    inflight: int = 0
    retired: bool = False


class LlamaBackend:
    def __init__(self, slots: int, adapter_cache: int):
        self.slots, self.adapter_cache = slots, adapter_cache
        self._lock = threading.Lock()  # the maps below, swaps of children
        self._prepare_lock = threading.Lock()  # conversions, one at a time
        self._prepared: dict[str, _Prepared] = {}
        self._servers: dict[Path, _Served] = {}

    def prepare(self, ref) -> _Prepared:
        """The files, tokenizer and stop ids of a model name (converted at its first use)."""
        if ref.name in self._prepared:
            return self._prepared[ref.name]
        with self._prepare_lock:
            if ref.name in self._prepared:
                return self._prepared[ref.name]
            quiet = lambda message: None  # noqa: E731 - the server's log is the request log
            if ref.adapter_kind == "checkpoint":
                run = Path(ref.source).parents[1]
                resolved = resolve_model(str(run), notify=quiet)
                tokenizer, stop_ids = tokenizer_and_stops(resolved, ref.tokenizer_dir)
                files = engine_files(resolved, tokenizer, stop_ids, quiet)
                if files.adapter is None:
                    raise AfinarError(f"{ref.name}: this run answers from merged weights, which "
                                      "a step checkpoint has none of")
                config_dir = Path(resolved.adapter)
                with tempfile.TemporaryDirectory(prefix="afinar-ckpt-") as scratch:
                    folder = checkpoint_adapter_folder(Path(ref.source), config_dir, Path(scratch))
                    adapter = adapter_gguf(folder, resolved.weights, quiet)
                files = EngineFiles(files.model, adapter, "base model + checkpoint LoRA",
                                    files.converted_by)
            else:
                resolved = resolve_model(ref.source or ref.base_spec, notify=quiet)
                tokenizer, stop_ids = tokenizer_and_stops(resolved, ref.tokenizer_dir)
                files = engine_files(resolved, tokenizer, stop_ids, quiet)
            prepared = _Prepared(files, tokenizer, stop_ids, resolved)
            self._prepared[ref.name] = prepared
            return prepared

    def _served_for(self, files: EngineFiles) -> _Served:
        """The child that has this model file and adapter (a new one when it lacks it)."""
        served = self._servers.get(files.model)
        if served is not None and (files.adapter is None or
                                   files.adapter in served.server.adapters):
            return served
        adapters = list(served.server.adapters) if served else []
        if files.adapter is not None:
            adapters = (adapters + [files.adapter])[-self.adapter_cache:]
        fresh = _Served(LlamaServer(files.model, adapters, slots=self.slots))
        fresh.server.start()
        if served is not None:
            served.retired = True
            if served.inflight == 0:
                served.server.close()
        self._servers[files.model] = fresh
        return fresh

    @contextmanager
    def model(self, ref):
        """A LlamaCppModel answering as `ref`, valid inside the block."""
        prepared = self.prepare(ref)
        with self._lock:
            served = self._served_for(prepared.files)
            served.inflight += 1
            lora = (served.server.adapters.index(prepared.files.adapter)
                    if prepared.files.adapter is not None else None)
        try:
            yield LlamaCppModel(served.server, lora, prepared.tokenizer, prepared.stop_ids,
                                prepared.resolved, prepared.files, owns_server=False)
        finally:
            with self._lock:
                served.inflight -= 1
                if served.retired and served.inflight == 0:
                    served.server.close()

    def forget(self, name: str) -> None:
        """A deleted model is no longer prepared; its adapter leaves at the next swap."""
        with self._lock:
            self._prepared.pop(name, None)

    def children(self) -> list[LlamaServer]:
        with self._lock:
            return [served.server for served in self._servers.values()]

    def close(self) -> None:
        with self._lock:
            for served in self._servers.values():
                served.server.close()
            self._servers.clear()
