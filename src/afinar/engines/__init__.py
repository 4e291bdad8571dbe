"""Which engine answers: `engine: auto | llamacpp | transformers`.

    model = open_model("runs/soporte", engine="auto")     # chat, generate
    answerer = answerer_for(loaded, engine="auto")        # evaluation (loaded: transformers)

- transformers: the model in this process, `generate` in batches (afinar.infer.generate). The
  engine on a GPU, and for anything llama.cpp cannot run.
- llamacpp: llama.cpp's own server on a GGUF of the base model (converted once, cached) with the
  run's LoRA as a GGUF adapter (afinar.engines.llamacpp). About 4x the transformers engine's
  batch-1 decode on a CPU, and parallel requests batched.
- auto: llamacpp on a CPU when llama-server and the converter are installed and the model
  converts; transformers otherwise, saying why (`engine_note`).

Every model either engine returns has `engine` ("transformers" or "llama.cpp"), `engine_note`,
complete/generate/stream/prompt_ids, and close().
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, get_args

from afinar.config import EngineName
from afinar.errors import AfinarError

ENGINES = get_args(EngineName)  # ("auto", "llamacpp", "transformers")


def check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise AfinarError(f"unknown engine {engine!r}", "choose auto, llamacpp or transformers")
    return engine


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp engine cannot start here, or None."""
    from afinar.engines.llama_server import server_binary
    from afinar.export.convert import converter_home

    if server_binary() is None:
        return "llama-server is not installed (scripts/install_llama_cpp.sh builds it)"
    if not (converter_home() / "convert_hf_to_gguf.py").is_file():
        return "llama.cpp's converter is not installed (scripts/install_llama_cpp.sh)"
    return None


def require_llama_cpp() -> None:
    """`engine: llamacpp` asked for: AfinarError with what to install when it cannot start."""
    if missing := llama_cpp_missing():
        from afinar.engines.llama_server import INSTALL_HINT

        raise AfinarError(f"engine llamacpp: {missing}", INSTALL_HINT)


def auto_reason(device: str) -> str | None:
    """Why `auto` does not pick llama.cpp before any model is looked at, or None."""
    from afinar.models.load import pick_device

    kind = pick_device(device).type
    if kind != "cpu":
        return (f"{kind}: transformers answers on a GPU (no GPU engine is wired in yet; "
                "docs/serving.md says how to put vLLM in front)")
    return llama_cpp_missing()


def tokenizer_and_stops(resolved, tokenizer_dir: str | None = None):
    """The tokenizer a model or run answers with (a run's own: its chat template) and the ids
    that end its answers, without loading its weights."""
    from afinar.models.load import load_tokenizer, read_generation_config, stop_token_ids

    tokenizer = load_tokenizer(tokenizer_dir or resolved.tokenizer_source)
    return tokenizer, stop_token_ids(
        tokenizer, generation_config=read_generation_config(resolved.weights))


def _open_llama(resolved, tokenizer, stop_ids, engine: str, notify, slots: int | None,
                fallback: Callable[[str], object]):
    from afinar.engines.llamacpp import DEFAULT_SLOTS, LlamaCppModel

    try:
        return LlamaCppModel.open(resolved, tokenizer, stop_ids, notify,
                                  slots=slots or DEFAULT_SLOTS)
    except AfinarError as exc:
        if engine == "llamacpp":
            raise
        return fallback(f"llama.cpp cannot run it: {exc.message}")


def open_model(spec: str, engine: str = "auto", device: str = "auto", notify: Callable = print,
               slots: int | None = None):
    """A model or run ready to answer, on the chosen engine (chat, generate, serve)."""
    from afinar.infer.generate import load

    check_engine(engine)
    reason = auto_reason(device) if engine == "auto" else None
    if engine == "transformers" or reason:
        model = load(spec, device=device, notify=notify)
        model.engine_note = reason or ""
        return model
    if engine == "llamacpp":
        require_llama_cpp()
    from afinar.models.registry import resolve_model

    resolved = resolve_model(spec, notify=notify)
    tokenizer, stop_ids = tokenizer_and_stops(resolved)

    def fallback(why: str):
        notify(f"{why}; answering with transformers")
        model = load(spec, device=device, notify=notify)
        model.engine_note = why
        return model
    return _open_llama(resolved, tokenizer, stop_ids, engine, notify, slots, fallback)


@dataclass(frozen=True)
class BaseAnswerer:
    """How a base model will answer, known before anything is converted or started: the
    preserve replay set looks its cached answers up under `signature` and opens the model only
    for those it lacks."""
    spec: str
    engine: str
    device: str
    signature: tuple[str, ...]

    def open(self, notify: Callable = print):
        return open_model(self.spec, self.engine, self.device, notify)


def base_answerer(spec: str, engine: str = "auto", device: str = "auto") -> BaseAnswerer | None:
    """The llama.cpp engine for a base model when `engine` picks it; None: transformers."""
    from afinar.engines.gguf_cache import base_gguf_path
    from afinar.export.convert import find_converter
    from afinar.models.registry import resolve_model

    check_engine(engine)
    if engine == "transformers" or (engine == "auto" and auto_reason(device)):
        return None
    try:
        resolved = resolve_model(spec, notify=lambda message: None)
        path = base_gguf_path(resolved)
    except (AfinarError, OSError, ValueError):  # not local, not convertible: transformers
        if engine == "llamacpp":
            raise
        return None
    if resolved.adapter is not None:
        return None  # a run, not a base model
    return BaseAnswerer(spec, "llamacpp", device, ("llama.cpp", find_converter().version,
                                                   path.name, "", "base model"))


def replay_answerer(config) -> BaseAnswerer | None:
    """What answers a training run's preserve replay set: the run's engine, in a single
    process (each rank of a multi-process run builds the set; they keep transformers)."""
    import os

    if not config.preserve_on() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return base_answerer(config.model, config.engine, config.device)


def answerer_for(loaded, engine: str = "auto", notify: Callable = print,
                 slots: int | None = None):
    """What answers for a model already loaded with transformers (evaluation keeps that one for
    its losses): itself, or the same model on llama.cpp."""
    check_engine(engine)
    reason = auto_reason(str(loaded.device)) if engine == "auto" else None
    if engine == "transformers" or reason:
        loaded.engine_note = reason or ""
        return loaded
    if engine == "llamacpp":
        require_llama_cpp()

    def fallback(why: str):
        notify(f"{why}; answering with transformers")
        loaded.engine_note = why
        return loaded
    return _open_llama(loaded.resolved, loaded.tokenizer, loaded.stop_ids, engine, notify, slots,
                       fallback)
