"""The llama.cpp engine: a model's answers from llama-server, with the interface of the
transformers engine (afinar.infer.generate.LoadedModel):

    model = LlamaCppModel.open(resolved, tokenizer, stop_ids, notify=print)
    model.complete(conversations, settings)     # in parallel, batched over the slots
    model.generate(conversations, settings)     # by llama.cpp's continuous batching
    for piece in model.stream(conversation, settings): ...
    model.close()                                # stops the server it started

Prompts are afinar's own: the run's chat template and tokenizer make the token ids, and the
generated ids are decoded and cut (end-of-turn token, reasoning block, stop strings) by the same
code as the transformers engine (completion_from_ids, answer_pieces).
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

from afinar.data.tokenize import ChatEncoder
from afinar.engines.gguf_cache import EngineFiles, engine_files
from afinar.engines.llama_server import LlamaServer
from afinar.infer.generate import (Answering, Completion, GenerationSettings, answer_pieces,
                                   completion_from_ids)
from afinar.models.registry import ResolvedModel

DEFAULT_SLOTS = 8


class LlamaCppModel(Answering):
    engine = "llama.cpp"

    def __init__(self, server: LlamaServer, lora: int | None, tokenizer, stop_ids: list[int],
                 resolved: ResolvedModel, files: EngineFiles, owns_server: bool = True):
        self.server, self.lora, self.tokenizer = server, lora, tokenizer
        self.stop_ids, self.resolved, self.files = stop_ids, resolved, files
        self.encoder = ChatEncoder(tokenizer, stop_ids)
        self.name = resolved.spec
        self._owns_server = owns_server

    @classmethod
    def open(cls, resolved: ResolvedModel, tokenizer, stop_ids: list[int],
             notify: Callable[[str], None] = print, slots: int = DEFAULT_SLOTS
             ) -> "LlamaCppModel":
        """Converts what is not converted yet, then starts a llama-server for this model."""
        files = engine_files(resolved, tokenizer, stop_ids, notify)
        server = LlamaServer(files.model, [files.adapter] if files.adapter else [], slots=slots)
        server.start()
        return cls(server, 0 if files.adapter else None, tokenizer, stop_ids, resolved, files)

    def describe(self) -> dict:
        """What answered, for reports and outputs: the engine and its files."""
        return {**super().describe(), "files": self.files.how,
                "model_file": str(self.files.model),
                "adapter_file": str(self.files.adapter) if self.files.adapter else None,
                "converted_by": self.files.converted_by}

    def engine_signature(self) -> list[str]:
        return [self.engine, self.files.converted_by, self.files.model.name,
                self.files.adapter.name if self.files.adapter else "", self.files.how]

    def complete(self, conversations: list, settings: GenerationSettings | None = None,
                 batch_size: int = 8, on_progress: Callable[[int], None] | None = None
                 ) -> list[Completion]:
        """One completion per conversation, in input order (`batch_size` is the transformers
        engine's; llama.cpp's slots decide here). Prompts go to llama-server in a few requests
        of many prompts each, not one request per prompt: its slots are not batch-invariant
        (llama.cpp #6583), so answers depended on which requests happened to arrive together;
        queued together, the same calls on a fresh server give the same answers, run after run
        (measured: 3 of 3 identical, against 4-6 of 36 answers differing before)."""
        settings = settings or GenerationSettings()
        prompts = [self.prompt_ids(c) for c in conversations]
        results: list[Completion] = []
        for group in request_groups(prompts, self.server.slots):
            outs = self.server.complete_many(group, settings.max_new_tokens, self.lora,
                                             settings.temperature, settings.top_p, settings.seed,
                                             list(settings.stop))
            results += [completion_from_ids(self.tokenizer, self.stop_ids, len(ids), out["tokens"],
                                            settings) for ids, out in zip(group, outs)]
            if on_progress:
                on_progress(len(group))
        return results

    def stream(self, conversation, settings: GenerationSettings | None = None,
               result: dict | None = None) -> Iterator[str]:
        """The answer's text as llama.cpp sends it (whole UTF-8 characters; the end-of-turn
        token's text is never sent); `result["completion"]` at the end, counted by llama.cpp."""
        settings = settings or GenerationSettings()
        prompt = self.prompt_ids(conversation)
        last: dict = {}

        def texts() -> Iterator[str]:
            started = False
            for chunk in self.server.stream(prompt, settings.max_new_tokens, self.lora,
                                            settings.temperature, settings.top_p, settings.seed,
                                            list(settings.stop)):
                last["chunks"] = last.get("chunks", 0) + 1
                text = chunk.get("content") or ""
                if not started:  # as the transformers engine's answers: no leading space
                    text = text.lstrip()
                    started = bool(text)
                if text:
                    yield text
                if chunk.get("stop"):
                    last.update(chunk)

        pieces = []
        for piece in answer_pieces(texts(), settings):
            pieces.append(piece)
            yield piece
        if result is not None:
            # Cut short by a stop string here: the chunks seen (one token each, or more).
            count = int(last.get("tokens_predicted") or last.get("chunks", 0))
            finish = "length" if last.get("stop_type") == "limit" else "stop"
            result["completion"] = Completion("".join(pieces).strip(), len(prompt), count, finish)

    def close(self) -> None:
        if self._owns_server:
            self.server.close()


PROMPTS_PER_SLOT = 8  # per request: a request's answers all arrive when its slowest is done


def request_groups(prompts: list, slots: int) -> list[list]:
    """`prompts` cut into equal requests of at most PROMPTS_PER_SLOT per slot: few enough that
    llama.cpp's slots stay busy (its continuous batching works within a request), enough for
    progress to move on long evaluations."""
    if not prompts:
        return []
    count = math.ceil(len(prompts) / (slots * PROMPTS_PER_SLOT))
    size = math.ceil(len(prompts) / count)
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]
