"""Loads a model or a run for inference and generates answers with its own chat template.

    model = afinar.load("runs/soporte")             # base + adapter, the run's tokenizer
    model.generate([[{"role": "user", "content": "Hola"}]])   # -> ["¡Hola! ..."]

A run directory is loaded with the tokenizer (and so the chat template and stop tokens) it was
trained with: the prompt at inference is the prompt the model learned on.
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
from afinar.models.load import load_causal_lm, load_tokenizer, pick_device, stop_token_ids
from afinar.models.registry import ResolvedModel, resolve_model


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy, reproducible
    top_p: float = 1.0

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}


def _as_messages(conversation) -> list[Message]:
    return [m if isinstance(m, Message) else Message(m["role"], m["content"])
            for m in conversation]


class LoadedModel:
    def __init__(self, model, tokenizer, resolved: ResolvedModel, device: torch.device):
        self.model, self.tokenizer, self.resolved, self.device = model, tokenizer, resolved, device
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.encoder = ChatEncoder(tokenizer, self.stop_ids)
        self.name = resolved.spec

    def prompt_ids(self, conversation) -> list[int]:
        """The token ids the model is given for a conversation (with the generation prompt)."""
        return self.encoder.prompt_ids(_as_messages(conversation))

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
        return {**settings.kwargs(), "eos_token_id": self.stop_ids,
                "pad_token_id": self.tokenizer.pad_token_id}

    @torch.inference_mode()
    def generate(self, conversations: list, settings: GenerationSettings | None = None,
                 batch_size: int = 8, on_progress: Callable[[int], None] | None = None
                 ) -> list[str]:
        """One answer per conversation (lists of messages ending with the user's turn)."""
        settings = settings or GenerationSettings()
        # Longest prompts together: less padding per batch. Results return in input order.
        order = sorted(range(len(conversations)),
                       key=lambda i: -sum(len(m["content"] if isinstance(m, dict) else m.content)
                                          for m in conversations[i]))
        answers: list[str] = [""] * len(conversations)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = self._prompt_batch([conversations[i] for i in chunk])
            out = self.model.generate(**batch, **self._generate_kwargs(settings))
            new = out[:, batch["input_ids"].shape[1]:]
            for i, row in zip(chunk, new):
                answers[i] = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            if on_progress:
                on_progress(len(chunk))
        return answers

    def stream(self, conversation, settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yields the answer's text piece by piece as it is generated."""
        from transformers import TextIteratorStreamer

        settings = settings or GenerationSettings()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True)
        batch = self._prompt_batch([conversation])
        worker = threading.Thread(target=self._generate_into, daemon=True,
                                  args=(batch, settings, streamer))
        worker.start()
        yield from streamer
        worker.join()

    @torch.inference_mode()
    def _generate_into(self, batch, settings, streamer) -> None:
        self.model.generate(**batch, **self._generate_kwargs(settings), streamer=streamer)


def load(spec: str, device: str = "auto", notify: Callable = print) -> LoadedModel:
    """A base model (name, folder, .gguf, hub id) or a run directory, ready to generate."""
    resolved = resolve_model(spec, notify=notify)
    dev = pick_device(device)
    tokenizer = load_tokenizer(resolved.tokenizer_source)
    model = load_causal_lm(resolved, torch.device("cpu"))
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
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, len(prompts))

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
