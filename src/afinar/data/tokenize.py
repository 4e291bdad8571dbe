"""Chat template → token ids + labels, with loss only where the model should learn.

The mask is computed without relying on `{% generation %}` markers (most templates lack them):
for every trained assistant turn we render the conversation up to that turn with the generation
prompt, and up to the end of that turn, and check that both token sequences are exact prefixes of
the full rendering. The tokens in between are the assistant's answer, including the end-of-turn
token the model must learn to emit to stop. If a template is not prefix-stable we refuse loudly
rather than train on a silently wrong mask.

Special tokens come only from the template (add_special_tokens=False), exactly as at inference
time, so BOS is never doubled and training and chat see the same prompt format.

Templates without a system role (Gemma 2, Mistral v0.1) raise on one; there the system message
is joined to the first user message, the way Gemma 3's own template does it, for training and
inference alike (`renderable`).
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
    weight: float = 1.0  # multiplies its tokens' loss (replay examples weigh less)...
    full_weight_tokens: int = 0  # ...except its first N supervised tokens, which weigh 1

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
        self._merges_system: bool | None = None

    # -- rendering --------------------------------------------------------------------------
    def _apply(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)

    @property
    def merges_system(self) -> bool:
        """True when the template refuses a system message but renders it joined to the first
        user message (then every conversation with a system message is rendered that way)."""
        if self._merges_system is None:
            probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
            try:
                self._apply(probe, True)
                self._merges_system = False
            except Exception:  # noqa: BLE001 (jinja's raise_exception: any exception type)
                try:
                    self._apply(_join_system(probe), True)
                    self._merges_system = True
                except Exception:  # noqa: BLE001
                    self._merges_system = False
        return self._merges_system

    def renderable(self, messages: list[dict]) -> list[dict]:
        """The messages as the template is given them (a refused system message joined to the
        first user message); exports verify plain transformers with these."""
        if (len(messages) > 1 and messages[0]["role"] == "system"
                and messages[1]["role"] == "user" and self.tokenizer.chat_template
                and self.merges_system):
            return _join_system(messages)
        return messages

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not self.tokenizer.chat_template:
            raise TemplateError("this model's tokenizer has no chat template",
                                "use an instruct/chat model, or {\"text\"} data")
        try:
            return self._apply(self.renderable(messages), generation_prompt)
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
            span = self._answer_span(msgs, i, full)
            if span is None:
                raise self._unstable(example, msgs, i)
            start, end = span
            labels[start:end] = full[start:end]
        return Tokenized(full, labels, index)

    def _answer_span(self, msgs: list[dict], i: int, full: list[int]) -> tuple[int, int] | None:
        """Where answer `i` lies in `full`, through its end-of-turn token; None when the
        rendering up to that answer is not a prefix of the whole one."""
        before = self._ids(self._render(msgs[:i], generation_prompt=True))
        prefix = self._ids(self._render(msgs[: i + 1], generation_prompt=False))
        start = len(before)
        # The answer ends at its first end-of-turn token: what the template writes after it
        # ("\n", or Phi-3's EOS after the last turn) is never generated, since generation stops
        # there, so it is neither trained nor required to match the whole conversation.
        end = next((j + 1 for j in range(start, len(prefix)) if prefix[j] in self.stop_ids),
                   len(prefix))
        if start >= end or full[:start] != before or full[:end] != prefix[:end]:
            return None
        return start, end

    def _unstable(self, example: Example, msgs: list[dict], i: int) -> TemplateError:
        where = (f"{example.where}: the chat template is not prefix-stable at message {i}: "
                 "rendering the conversation up to this answer does not give a prefix of the "
                 "whole conversation, so the loss mask cannot be computed reliably")
        if msgs[0]["role"] == "system":
            rest = msgs[1:]
            try:
                stable = self._answer_span(rest, i - 1, self._ids(self._render(rest, False)))
            except TemplateError:
                stable = None
            if stable is not None:
                return TemplateError(
                    where + ": this template writes the system message in a place that depends "
                    "on where the conversation ends (Mistral's joins it to the last user turn "
                    "and leaves it out of a conversation that ends with an answer)",
                    "remove the system messages from the data, or write their text at the start "
                    "of the first user message")
        return TemplateError(where, "use a model whose template renders earlier turns unchanged "
                             "(most do), or split multi-turn examples into one example per "
                             "answer (earlier answers as context with \"weight\": 0)")

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


def _join_system(messages: list[dict]) -> list[dict]:
    system, user = messages[0], messages[1]
    joined = {**user, "content": f"{system['content']}\n\n{user['content']}"}
    return [joined, *messages[2:]]


def fit_length(item: Tokenized, max_len: int, overflow: str) -> Tokenized | None:
    """Applies max_seq_length: truncate (keeping the start) or drop; None means dropped."""
    if len(item.input_ids) <= max_len:
        return item
    if overflow == "drop":
        return None
    labels = item.labels[:max_len]
    if all(x == IGNORE for x in labels):
        return None  # nothing left to learn from after truncation
    return Tokenized(item.input_ids[:max_len], labels, item.index, truncated=True,
                     weight=item.weight, full_weight_tokens=item.full_weight_tokens)
