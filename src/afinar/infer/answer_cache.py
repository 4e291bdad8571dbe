"""Greedy answers remembered across evaluations, so the base model is not asked again.

Every run of one base model is compared with the same base answers; on a CPU those are half the
time of an evaluation (the base model often rambles to the answer budget). Greedy decoding is
deterministic, so an answer is stored under everything it depends on: the weights (file names,
sizes and modification times of the model and adapter folders), the tokenizer and chat
template, the prompt's token ids, the generation settings and the library versions. Sampled
answers (temperature > 0) are never cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from afinar import rundir
from afinar.data.cache import tokenizer_fingerprint
from afinar.paths import afinar_home

_VERSION = "1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".pt")


def _files_signature(folder: str | Path | None) -> list:
    if folder is None or not Path(folder).exists():
        return [str(folder)]  # a hub id: its name is all we know
    root = Path(folder)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return [[str(p.relative_to(root) if p != root else p.name), p.stat().st_size,
             p.stat().st_mtime_ns] for p in files]


def model_fingerprint(loaded, settings) -> str:
    resolved = loaded.resolved
    digest = hashlib.sha256(_VERSION.encode())
    # A QLoRA run's base weights are what bitsandbytes makes of the files.
    quantized = [] if resolved.quantization == "none" else [
        resolved.quantization, resolved.precision, importlib.metadata.version("bitsandbytes")]
    digest.update(json.dumps([
        _files_signature(resolved.weights), _files_signature(resolved.adapter),
        *[_files_signature(folder) for folder in resolved.merged_adapters],
        tokenizer_fingerprint(loaded.encoder), sorted(loaded.stop_ids), settings.kwargs(),
        *loaded.engine_signature(), *quantized]).encode())
    return digest.hexdigest()[:32]


class AnswerCache:
    """`answers = cache.lookup(prompts)` (None where unknown); `cache.store(prompts, answers)`."""

    def __init__(self, loaded, settings):
        self.loaded = loaded
        self.enabled = settings.temperature <= 0
        self.file = (afinar_home() / "cache" / "answers" /
                     f"{model_fingerprint(loaded, settings)}.json") if self.enabled else None
        self._entries: dict[str, str] = {}
        if self.file is not None and self.file.is_file():
            try:
                self._entries = json.loads(self.file.read_text(encoding="utf-8"))
            except ValueError:
                self._entries = {}  # a damaged file is rebuilt

    def _key(self, conversation) -> str:
        ids = self.loaded.prompt_ids(conversation)
        return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:32]

    def lookup(self, prompts: list) -> list[str | None]:
        if not self.enabled:
            return [None] * len(prompts)
        return [self._entries.get(self._key(p)) for p in prompts]

    def store(self, prompts: list, answers: list[str]) -> None:
        if not self.enabled or not prompts:
            return
        for prompt, answer in zip(prompts, answers):
            self._entries[self._key(prompt)] = answer
        rundir.write_json_atomic(self.file, self._entries)
