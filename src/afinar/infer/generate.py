"""Loads a model or a run for inference and generates answers with its own chat template.

    model = afinar.load("runs/soporte")             # base + adapter, the run's tokenizer
    model.generate([[{"role": "user", "content": "Hola"}]])   # -> ["¡Hola! ..."]

A run directory is loaded with the tokenizer (and so the chat template and stop tokens) it was
trained with: the prompt at inference is the prompt the model learned on. A QLoRA run's adapter
is merged into its base quantised and de-quantised as in training (the weights it learned on).

Reasoning models (Qwen3, DeepSeek-R1 distills) open their answer with a `<think>...</think>`
block (an empty one when trained on plain answers); the answer returned is what follows it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from afinar.data.example import Message
from afinar.data.tokenize import ChatEncoder
from afinar.data.validate import load_examples
from afinar.errors import AfinarError, DataError
from afinar.models import adapters
from afinar.models.load import load_inference_base, load_tokenizer, pick_device, stop_token_ids
from afinar.models.registry import ResolvedModel, resolve_model


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy, reproducible
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)
    seed: int | None = None  # makes sampling reproducible

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length" (budget reached)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


def _after_reasoning(text: str) -> tuple[str, bool]:
    """(the answer after a leading <think>...</think> block, whether that block may still be
    open: while it is, nothing of the answer is known yet)."""
    head = text.lstrip()
    if head.startswith(_THINK_OPEN):
        close = head.find(_THINK_CLOSE)
        if close < 0:
            return "", True
        return head[close + len(_THINK_CLOSE):].lstrip(), False
    if head and _THINK_OPEN.startswith(head):
        return "", True  # the first pieces of what may be "<think>"
    return text, False


def as_messages(conversation) -> list[Message]:
    return [m if isinstance(m, Message) else Message(m["role"], m["content"])
            for m in conversation]


def completion_from_ids(tokenizer, stop_ids, prompt_len: int, ids: list[int],
                        settings: GenerationSettings) -> Completion:
    """The Completion for generated token ids, whichever engine generated them: cut after the
    first end-of-turn token, a leading reasoning block and a stop string removed."""
    ended = next((k for k, t in enumerate(ids) if t in stop_ids), None)
    kept = ids if ended is None else ids[:ended + 1]  # the end-of-turn token counts
    text = _after_reasoning(tokenizer.decode(kept, skip_special_tokens=True))[0]
    text, stopped = _cut_at_stop(text, settings.stop)
    finish = "stop" if ended is not None or stopped or len(kept) < settings.max_new_tokens \
        else "length"
    return Completion(text.strip(), prompt_len, len(kept), finish)


def answer_pieces(pieces: Iterator[str], settings: GenerationSettings) -> Iterator[str]:
    """The answer's text, piece by piece, from the generated text's pieces: a reasoning block
    held back, and the text cut at a stop string (which may arrive split over pieces: what
    could be its beginning is held back until it is known)."""
    sent, text, stopped = "", "", False
    hold = max((len(stop) - 1 for stop in settings.stop if stop), default=0)
    answer = ""
    for piece in pieces:
        text += piece
        answer, thinking = _after_reasoning(text)
        if thinking:
            continue
        cut, stopped = _cut_at_stop(answer, settings.stop)
        upto = len(cut) if stopped else max(len(sent), len(answer) - hold)
        if upto > len(sent):
            yield answer[len(sent):upto]
            sent = answer[:upto]
        if stopped:
            return
    if len(answer) > len(sent):
        yield answer[len(sent):]


def transformers_signature(device) -> list[str]:
    """What, besides the weights and the prompt, decides a greedy answer of the transformers
    engine (answer_cache's key)."""
    import transformers

    return [str(device), torch.__version__, transformers.__version__]


class Answering:
    """What every engine's model has (afinar.engines): `complete` (its own), and from it
    `generate`; prompt ids from its `encoder` (afinar's template and tokenizer); `describe()`
    for reports; `close()`."""

    engine = ""
    engine_note = ""  # why this engine answers, when it was not the one asked for

    def prompt_ids(self, conversation) -> list[int]:
        """The token ids the model is given for a conversation (with the generation prompt)."""
        return self.encoder.prompt_ids(as_messages(conversation))

    def generate(self, conversations: list, settings: GenerationSettings | None = None,
                 batch_size: int = 8, on_progress: Callable[[int], None] | None = None
                 ) -> list[str]:
        """One answer per conversation (lists of messages ending with the user's turn)."""
        return [c.text for c in self.complete(conversations, settings, batch_size, on_progress)]

    def describe(self) -> dict:
        """Which engine answered (and why, when it was not the one asked for)."""
        return {"engine": self.engine, **({"note": self.engine_note} if self.engine_note else {})}

    def close(self) -> None:
        """Nothing to release beyond the weights (the llama.cpp engine stops its server)."""


class LoadedModel(Answering):
    """The transformers engine: the model's weights in this process, `generate` in batches."""

    engine = "transformers"

    def __init__(self, model, tokenizer, resolved: ResolvedModel, device: torch.device):
        self.model, self.tokenizer, self.resolved, self.device = model, tokenizer, resolved, device
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.encoder = ChatEncoder(tokenizer, self.stop_ids)
        self.name = resolved.spec

    def engine_signature(self) -> list[str]:
        return transformers_signature(self.device)

    def _prompt_batch(self, conversations) -> dict[str, torch.Tensor]:
        prompts = [self.prompt_ids(c) for c in conversations]
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row ends at its prompt
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _generate_kwargs(self, settings: GenerationSettings) -> dict:
        extra = {}
        if settings.stop:  # stop early on the GPU/CPU side too, not only by cutting the text
            extra = {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer}
        return {**settings.kwargs(), "eos_token_id": self.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id, **extra}

    def _completion(self, prompt_len: int, new_ids: torch.Tensor,
                    settings: GenerationSettings) -> Completion:
        return completion_from_ids(self.tokenizer, self.stop_ids, prompt_len, new_ids.tolist(),
                                   settings)

    @torch.inference_mode()
    def complete(self, conversations: list, settings: GenerationSettings | None = None,
                 batch_size: int = 8, on_progress: Callable[[int], None] | None = None
                 ) -> list[Completion]:
        """One completion (text, token counts, finish reason) per conversation."""
        settings = settings or GenerationSettings()
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        # Longest prompts together: less padding per batch. Results return in input order.
        order = sorted(range(len(conversations)),
                       key=lambda i: -sum(len(m["content"] if isinstance(m, dict) else m.content)
                                          for m in conversations[i]))
        results: list[Completion | None] = [None] * len(conversations)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self._prompt_batch([conversations[i] for i in chunk])
            out = self.model.generate(**batch, **self._generate_kwargs(settings))
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(chunk):
                prompt_len = int(batch["attention_mask"][row].sum())
                results[i] = self._completion(prompt_len, out[row, width:], settings)
            if on_progress:
                on_progress(len(chunk))
        return results

    def stream(self, conversation, settings: GenerationSettings | None = None,
               result: dict | None = None) -> Iterator[str]:
        """Yields the answer's text piece by piece as it is generated; when it ends, `result`
        (if given) receives the Completion under "completion" (token counts, finish reason)."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        batch = self._prompt_batch([conversation])
        output: dict = {}
        worker = threading.Thread(target=self._generate_into, daemon=True,
                                  args=(batch, settings, streamer, output))
        worker.start()
        yield from answer_pieces(streamer, settings)
        worker.join()
        if result is not None and "ids" in output:
            width = batch["input_ids"].shape[1]
            result["completion"] = self._completion(width, output["ids"][0, width:], settings)

    @torch.inference_mode()
    def _generate_into(self, batch, settings, streamer, output: dict) -> None:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        output["ids"] = self.model.generate(**batch, **self._generate_kwargs(settings),
                                            streamer=streamer)


def running_count(report: Callable[[int], None], start: int = 0) -> Callable[[int], None]:
    """`on_progress` for generate(), which reports each batch's size: calls `report` with the
    running total instead."""
    done = start

    def add(n: int) -> None:
        nonlocal done
        done += n
        report(done)
    return add


def load(spec: str, device: str = "auto", notify: Callable = print) -> LoadedModel:
    """A base model (name, folder, .gguf, hub id) or a run directory, ready to generate."""
    resolved = resolve_model(spec, notify=notify)
    dev = pick_device(device)
    tokenizer = load_tokenizer(resolved.tokenizer_source)
    if resolved.quantization != "none":
        notify(f"QLoRA run: its base is quantised to {resolved.quantization} as in training "
               f"(from {resolved.precision} weights), then de-quantised to fp32 for inference")
    model = load_inference_base(resolved)
    if resolved.adapter is not None:
        model = adapters.load_adapter(model, resolved.adapter, merge=True)
    model = model.to(dev).eval()
    return LoadedModel(model, tokenizer, resolved, dev)


def generate_file(model: LoadedModel, input_path: str, output_path: str,
                  settings: GenerationSettings | None = None, batch_size: int = 8,
                  on_progress: Callable[[int, int], None] | None = None) -> int:
    """Answers every conversation of `input_path` (a trailing assistant turn is dropped first)
    and writes them with the generated answer to `output_path`, atomically."""
    report = load_examples(input_path, for_training=False)
    if not report.ok:
        raise DataError(f"{input_path}: {len(report.errors)} problem(s) in the input", report)
    chats = [ex for ex in report.examples if ex.is_chat]
    if len(chats) != len(report.examples):
        raise AfinarError(f"{input_path}: generate needs conversations, not raw text examples")
    prompts = [list(ex.prompt_messages()) if ex.messages[-1].role == "assistant"
               else list(ex.messages) for ex in chats]
    progress = running_count(lambda done: on_progress(done, len(prompts))) if on_progress else None
    answers = model.generate(prompts, settings, batch_size, progress)
    out = Path(output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        for prompt, answer, ex in zip(prompts, answers, chats):
            record = {"messages": [{"role": m.role, "content": m.content} for m in prompt]
                      + [{"role": "assistant", "content": answer}]}
            if ex.messages[-1].role == "assistant":
                record["reference"] = ex.messages[-1].content
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return len(prompts)
