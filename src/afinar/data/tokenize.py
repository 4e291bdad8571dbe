"""Chat template → token ids + labels, with loss only where the model should learn.

The mask is computed without relying on `{% generation %}` markers (most templates lack them):
for every trained assistant turn we render the conversation up to that turn with the generation
prompt, and up to the end of that turn, and check that both token sequences are exact prefixes of
the full rendering. The tokens in between are the assistant's answer, including the end-of-turn
token the model must learn to emit to stop. If a template is not prefix-stable we refuse loudly
rather than train on a silently wrong mask.

Special tokens come only from the template (add_special_tokens=False), exactly as at inference
time, so BOS is never doubled and training and chat see the same prompt format.
"""

from __future__ import annotations

from dataclasses import dataclass

from afinar.data.example import Example
from afinar.errors import AfinarError

IGNORE = -100  # label for positions that carry no loss (PyTorch's cross-entropy default)


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    index: int  # position of the source example in its list
    truncated: bool = False

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class TemplateError(AfinarError):
    pass


class ChatEncoder:
    """Encodes Examples for one tokenizer; `stop_ids` are the end-of-turn/EOS token ids."""

    def __init__(self, tokenizer, stop_ids: list[int]):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)

    # -- rendering --------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise TemplateError("this model's tokenizer has no chat template",
                                "use an instruct/chat model, or {\"text\"} data")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja errors: templates raise for unsupported role orders
            raise TemplateError(f"the chat template cannot render this conversation: {exc}",
                                "check the order of roles (e.g. system first, user/assistant "
                                "alternating)") from None

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # a template that writes BOS on top of a tokenizer that adds it
        return ids

    @staticmethod
    def _as_dicts(messages) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in messages]

    def prompt_ids(self, messages) -> list[int]:
        """What inference feeds the model: the conversation plus the assistant generation prompt."""
        return self._ids(self._render(self._as_dicts(messages), generation_prompt=True))

    # -- training encoding --------------------------------------------------------------------
    def encode(self, example: Example, index: int = 0) -> Tokenized:
        if not example.is_chat:
            return self._encode_text(example, index)
        msgs = self._as_dicts(example.messages)
        full = self._ids(self._render(msgs, generation_prompt=False))
        labels = [IGNORE] * len(full)
        for i, message in enumerate(example.messages):
            if not message.train:
                continue
            before = self._ids(self._render(msgs[:i], generation_prompt=True))
            prefix = self._ids(self._render(msgs[: i + 1], generation_prompt=False))
            start = len(before)
            if full[: len(before)] != before or full[: len(prefix)] != prefix or start >= len(
                    prefix):
                raise TemplateError(
                    f"{example.where}: the chat template is not prefix-stable at message {i}: "
                    "rendering the conversation up to this answer does not give a prefix of the "
                    "whole conversation, so the loss mask cannot be computed reliably",
                    "use a model whose template renders earlier turns unchanged (most do), or "
                    "split multi-turn examples into one example per answer")
            end = len(prefix)
            # Stop after the end-of-turn token: what the template writes after it (e.g. "\n")
            # is never generated, since generation stops at that token.
            for j in range(end - 1, start - 1, -1):
                if prefix[j] in self.stop_ids:
                    end = j + 1
                    break
            labels[start:end] = full[start:end]
        return Tokenized(full, labels, index)

    def _encode_text(self, example: Example, index: int) -> Tokenized:
        ids = self.tokenizer(example.text, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        labels = list(ids)
        bos = self.tokenizer.bos_token_id
        if bos is not None and ids and ids[0] == bos:
            labels[0] = IGNORE  # nothing predicts the first token
        return Tokenized(ids, labels, index)


def fit_length(item: Tokenized, max_len: int, overflow: str) -> Tokenized | None:
    """Applies max_seq_length: truncate (keeping the start) or drop; None means dropped."""
    if len(item.input_ids) <= max_len:
        return item
    if overflow == "drop":
        return None
    labels = item.labels[:max_len]
    if all(x == IGNORE for x in labels):
        return None  # nothing left to learn from after truncation
    return Tokenized(item.input_ids[:max_len], labels, item.index, truncated=True)
