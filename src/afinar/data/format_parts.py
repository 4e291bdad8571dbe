"""The pieces every example format is made of: the Format entry and the field readers its
parsers share (text fields, message lists with roles and weights, a trainable answer).
formats.py (SFT formats, the registry) and preference_formats.py build on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from afinar.data.example import Example, Message
from afinar.data.issues import IssueSink


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[dict], bool]
    parse: Callable[[dict, IssueSink], Example | None]
    family: str = "sft"  # "preference": pairs of answers for DPO/ORPO


def text_field(value, field: str, sink: IssueSink, *, allow_empty: bool = False) -> str | None:
    """A string field, or OpenAI's list of text parts joined; reports wrong types and emptiness."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                sink.error(f"{field}[{i}]", "only text parts are supported",
                           'use {"type": "text", "text": "..."} or a plain string')
                return None
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        sink.error(field, f"is {kind}", "give the text as a JSON string")
        return None
    if not allow_empty and not value.strip():
        sink.error(field, "is empty", "remove the example or write the text")
        return None
    return value


# --- chat: {"messages": [{"role": ..., "content": ..., "weight": 0|1}]} (OpenAI) ----------------

_ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _parse_weight(msg: dict, role: str, field: str, sink: IssueSink) -> bool:
    if "weight" not in msg:
        return role == "assistant"
    weight = msg["weight"]
    if role != "assistant":
        sink.error(f"{field}.weight", f"weight is only allowed on assistant messages, not {role}",
                   "remove the weight; only assistant messages are trained")
        return False
    if isinstance(weight, bool) or weight not in (0, 1):
        sink.error(f"{field}.weight", f"must be 0 or 1, got {weight!r}",
                   "1 trains on this message, 0 keeps it as context only")
        return False
    return weight == 1


def parse_messages(messages, field: str, sink: IssueSink) -> list[Message] | None:
    if not isinstance(messages, list) or not messages:
        sink.error(field, "must be a non-empty list of messages",
                   'e.g. [{"role": "user", "content": "..."}, {"role": "assistant", ...}]')
        return None
    parsed: list[Message] = []
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(msg, dict):
            sink.error(where, "must be an object with role and content")
            continue
        role_raw = msg.get("role")
        role = _ROLE_ALIASES.get(role_raw) if isinstance(role_raw, str) else None
        if role is None:
            sink.error(f"{where}.role", f"unknown role {role_raw!r}",
                       "use system, developer, user or assistant")
            continue
        if msg.get("tool_calls") or msg.get("function_call"):
            sink.error(where, "tool calls are not supported yet",
                       "remove tool-calling examples from this file")
            continue
        content = text_field(msg.get("content"), f"{where}.content", sink)
        train = _parse_weight(msg, role, where, sink)
        if content is not None:
            parsed.append(Message(role, content, train))
    return parsed


def require_trainable(example: Example, field: str, sink: IssueSink) -> None:
    """Training needs at least one assistant message with weight 1; inference input does not."""
    messages = example.messages
    if example.is_chat and not any(m.train for m in messages):
        if any(m.role == "assistant" for m in messages):
            sink.error(field, "every assistant message has weight 0: nothing to learn",
                       "set weight 1 (or remove weight) on at least one assistant message")
        else:
            sink.error(field, "has no assistant message: nothing to learn",
                       "end the conversation with the assistant answer you want")
