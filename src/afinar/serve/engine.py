"""Inference for the server: each base model loaded once, fine-tuned LoRA adapters attached to it
and switched per request (no reload), with a bounded LRU of loaded adapters.

Two engines (settings.engine): llama.cpp (serve/llama_backend.py: a llama-server child per base
model, adapters chosen per request, parallel slots with continuous batching) and transformers
(below). `auto` answers with llama.cpp on a CPU where it is installed, and with transformers a
model llama.cpp cannot run (said once in the log, and in /v1/models' `engine`).

A model name resolves to (base, adapter source):
    smollm2-135m-instruct                       a base model (settings.models + the default)
    ft:BASE:ORG:SUFFIX:ID                       a succeeded job's adapter (RUN/adapter)
    ft:BASE:ORG:SUFFIX:ID:ckpt-step-N           a checkpoint of a job (its saved LoRA tensors)

One generation runs at a time per engine (a lock): CPU generation already uses every core, and
peft's active adapter is state of the shared model. Non-streaming requests that arrive together
for the same model with the same settings are answered as one batch (`complete`): decoding is
bound by reading the weights, so a batch of 8 costs little more than one answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from afinar import rundir
from afinar.engines import auto_reason
from afinar.engines.llama_server import INSTALL_HINT, EngineUnavailable
from afinar.errors import AfinarError
from afinar.serve.errors import ApiError
from afinar.serve.settings import ServeSettings
from afinar.serve.store import Store


@dataclass(frozen=True)
class ModelRef:
    name: str
    base_spec: str
    adapter_kind: str | None = None  # None (base), "final" or "checkpoint"
    source: str | None = None  # run directory, or checkpoint folder
    tokenizer_dir: str | None = None


class Engine:
    def __init__(self, settings: ServeSettings, store: Store):
        self.settings, self.store = settings, store
        self.lock = threading.Lock()
        self._bases: dict[str, object] = {}  # base spec -> LoadedModel (model is a PeftModel
        # once an adapter is attached)
        self._adapters: OrderedDict[str, str] = OrderedDict()  # model name -> adapter name
        self._tokenizers: dict[str, object] = {}
        self._pending: queue.Queue = queue.Queue()
        self._batcher = threading.Thread(target=self._batch_loop, daemon=True)
        self._batcher.start()
        self.llama = None
        self._fallback: dict[str, str] = {}  # model name -> why transformers answers it
        if settings.engine != "transformers":
            reason = auto_reason("auto")
            if reason is None:
                from afinar.serve.llama_backend import LlamaBackend

                self.llama = LlamaBackend(settings.llama_slots, settings.adapter_cache)
            elif settings.engine == "llamacpp":
                raise AfinarError(f"engine llamacpp: {reason}", INSTALL_HINT)
            else:  # auto, on a GPU or without llama-server
                logging.getLogger("afinar.serve").warning(
                    "engine auto: transformers answers (%s)", reason)

    # --- which engine answers ------------------------------------------------------------------
    def engine_of(self, name: str) -> str:
        return "llama.cpp" if self.llama and name not in self._fallback else "transformers"

    @contextmanager
    def _on_llama(self, ref: ModelRef):
        """The LlamaCppModel for `ref`, or None when transformers answers it. A model llama.cpp
        cannot run falls back under `auto` (remembered) and is an error under `llamacpp`; a
        child that dies mid-answer is a 503."""
        if self.llama is None or ref.name in self._fallback:
            yield None
            return
        try:
            self.llama.prepare(ref)
        except EngineUnavailable as exc:
            raise _unavailable(ref, exc) from None
        except AfinarError as exc:
            if self.settings.engine == "llamacpp":
                raise ApiError(400, f"llama.cpp cannot serve '{ref.name}': {exc.message}; set "
                               "engine: auto or transformers in the server settings.",
                               param="model", code="model_not_supported") from None
            self._fallback[ref.name] = exc.message
            logging.getLogger("afinar.serve").warning(
                "%s answers with transformers: llama.cpp cannot run it (%s)", ref.name,
                exc.message)
            yield None
            return
        try:
            with self.llama.model(ref) as model:
                yield model
        except EngineUnavailable as exc:
            raise _unavailable(ref, exc) from None

    def close(self) -> None:
        if self.llama is not None:
            self.llama.close()

    # --- batched completions ------------------------------------------------------------------
    MAX_BATCH = 16

    def complete(self, name: str, conversation: list[dict], settings):
        """One completion; on llama.cpp, one request among those it batches; on transformers,
        waits while requests that arrived together are batched."""
        return self.submit(name, conversation, settings).result()

    def submit(self, name: str, conversation: list[dict], settings) -> Future:
        """`complete` without waiting: a future of the completion. On transformers the batch
        thread answers it, so an async caller awaits it without holding a worker thread (a
        thread pool full of waiting requests would starve a streaming answer, which holds the
        model while each of its chunks needs a thread)."""
        ref = self.resolve(name)  # unknown names fail here, not in the batch thread
        future: Future = Future()
        with self._on_llama(ref) as model:
            if model is not None:
                future.set_result(model.complete([conversation], settings)[0])
                return future
        self._pending.put((name, conversation, settings, future))
        return future

    def _batch_loop(self) -> None:
        # Requests wait in arrival order: the oldest one is answered next, with the requests
        # for the same model and settings that wait behind it (putting the others back at the
        # end of the queue let a busy model starve the rest: 5 of 25 requests to a fine-tune
        # timed out under 45 clients of its base, found by bench/bench_team.py).
        backlog: deque = deque()
        while True:
            if not backlog:
                backlog.append(self._pending.get())
            while True:
                try:
                    backlog.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            first = backlog.popleft()
            group = [first]
            key = (first[0], repr(first[2]))
            # Sampling with a seed is reproducible only alone: such requests are not batched.
            if first[2].seed is None or first[2].temperature <= 0:
                rest: deque = deque()
                for item in backlog:
                    same = (item[0], repr(item[2])) == key and len(group) < self.MAX_BATCH
                    (group if same else rest).append(item)
                backlog = rest
            try:
                with self.use(first[0]) as loaded:
                    results = loaded.complete([g[1] for g in group], first[2],
                                              batch_size=len(group))
                for item, result in zip(group, results):
                    item[3].set_result(result)
            except BaseException as exc:  # delivered to every waiting request
                for item in group:
                    if not item[3].done():
                        item[3].set_exception(exc)

    # --- names ------------------------------------------------------------------------------
    def resolve(self, name: str, project: str | None = None) -> ModelRef:
        """What a model name is; a fine-tune or checkpoint of another project than `project`
        (None: any) is a 404, as a name that does not exist."""
        bases = self.settings.base_models()
        if name in bases:
            return ModelRef(name, bases[name])
        job = self.store.job_by_model(name, project)
        if job is not None:
            run = Path(job["run_dir"])
            return ModelRef(name, job["base_spec"], "final", str(run),
                            str(run / rundir.TOKENIZER_DIR))
        checkpoint = self.store.checkpoint_by_model(name, project)
        if checkpoint is not None:
            job = self.store.job(checkpoint["job_id"])
            run = Path(job["run_dir"])
            return ModelRef(name, job["base_spec"], "checkpoint", checkpoint["path"],
                            str(run / rundir.TOKENIZER_DIR))
        raise ApiError(404, f"The model '{name}' does not exist or you do not have access to "
                       "it.", param="model", code="model_not_found")

    # --- loading ----------------------------------------------------------------------------
    def _base(self, spec: str):
        if spec not in self._bases:
            from afinar.infer.generate import load

            self._bases[spec] = load(spec, notify=lambda message: None)
        return self._bases[spec]

    def _attach(self, loaded, ref: ModelRef) -> str:
        """Loads the adapter of `ref` into the base's PeftModel (once); returns its name."""
        from peft import LoraConfig, PeftModel

        if ref.name in self._adapters:
            self._adapters.move_to_end(ref.name)
            return self._adapters[ref.name]
        adapter_name = f"a{abs(hash(ref.name)) % 10**12}"
        if ref.adapter_kind == "final":
            folder = Path(ref.source) / rundir.ADAPTER_DIR
            if not folder.is_dir():
                raise ApiError(404, f"The model '{ref.name}' has no adapter on disk (full "
                               "fine-tunes are not served yet).", param="model",
                               code="model_not_found")
            if isinstance(loaded.model, PeftModel):
                loaded.model.load_adapter(str(folder), adapter_name=adapter_name)
            else:
                loaded.model = PeftModel.from_pretrained(loaded.model, str(folder),
                                                         adapter_name=adapter_name)
        else:  # a step checkpoint: the LoRA tensors saved by training, under our name
            run = Path(ref.source).parents[1]
            config_dir = next((d for d in (run / rundir.ADAPTER_DIR,
                                           run / rundir.CHECKPOINTS_DIR / "best")
                               if (d / "adapter_config.json").is_file()), None)
            if config_dir is None:
                raise ApiError(404, f"The checkpoint '{ref.name}' is not available yet.",
                               param="model", code="model_not_found")
            config = LoraConfig.from_pretrained(str(config_dir))
            if isinstance(loaded.model, PeftModel):
                loaded.model.add_adapter(adapter_name, config)
            else:
                loaded.model = PeftModel(loaded.model, config, adapter_name=adapter_name)
            payload = torch.load(Path(ref.source) / "state.pt", map_location="cpu",
                                 weights_only=False)
            state = {k.replace(".default.", f".{adapter_name}."): v
                     for k, v in payload["trainable"].items()}
            loaded.model.load_state_dict(state, strict=False)
        loaded.model.eval()
        self._adapters[ref.name] = adapter_name
        while len(self._adapters) > self.settings.adapter_cache:
            _, old = self._adapters.popitem(last=False)
            loaded.model.delete_adapter(old)
        return adapter_name

    @contextmanager
    def use(self, name: str):
        """The model for `name`, ready for one generation: on llama.cpp a LlamaCppModel; on
        transformers the LoadedModel with its adapter active, the engine's lock held."""
        ref = self.resolve(name)
        with self._on_llama(ref) as model:
            if model is not None:
                yield model
                return
        with self.lock:
            loaded = self._base(ref.base_spec)
            if ref.adapter_kind is None:
                disable = getattr(loaded.model, "disable_adapter", None)
                with (disable() if disable else nullcontext()):
                    yield loaded
                return
            adapter = self._attach(loaded, ref)
            loaded.model.set_adapter(adapter)
            tokenizer = self._tokenizer_for(ref, loaded)
            yield _with_tokenizer(loaded, tokenizer)

    def _tokenizer_for(self, ref: ModelRef, loaded):
        """A run's own tokenizer (its chat template is the one it trained with)."""
        if not ref.tokenizer_dir or not Path(ref.tokenizer_dir).is_dir():
            return loaded.tokenizer
        if ref.tokenizer_dir not in self._tokenizers:
            from afinar.models.load import load_tokenizer

            self._tokenizers[ref.tokenizer_dir] = load_tokenizer(ref.tokenizer_dir)
        return self._tokenizers[ref.tokenizer_dir]

    def forget(self, name: str) -> None:
        """Drops a deleted model's adapter from memory."""
        if self.llama is not None:
            self.llama.forget(name)
        with self.lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                return
            for loaded in self._bases.values():
                if adapter in getattr(loaded.model, "peft_config", {}):
                    loaded.model.delete_adapter(adapter)


def _unavailable(ref: ModelRef, exc: EngineUnavailable) -> ApiError:
    return ApiError(503, f"The model '{ref.name}' could not answer: {exc.message} Retry the "
                    "request.", type="server_error", code="engine_unavailable")


def _with_tokenizer(loaded, tokenizer):
    if tokenizer is loaded.tokenizer:
        return loaded
    from afinar.infer.generate import LoadedModel

    return LoadedModel(loaded.model, tokenizer, loaded.resolved, loaded.device)
