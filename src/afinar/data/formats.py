"""Readers for the example formats the fine-tuning guides use, all producing `Example`s.

Each format is one small entry in FORMATS (name, how to recognise a record, how to parse it), the
same registry an extension would add to. Parsers report every problem of a record through an
IssueSink instead of raising, so validation can list them all.
"""

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


def _parse_chat(record: dict, sink: IssueSink) -> Example | None:
    if record.get("tools") or record.get("functions"):
        sink.error("tools", "tool definitions are not supported yet", "remove tool-calling examples")
    messages = parse_messages(record.get("messages"), "messages", sink)
    if sink.failed:
        return None
    extra = {k: v for k, v in record.items() if k != "messages"}
    return Example(tuple(messages), extra=extra)


# --- prompt/completion ------------------------------------------------------------------------

def _parse_prompt_completion(record: dict, sink: IssueSink) -> Example | None:
    prompt = text_field(record.get("prompt"), "prompt", sink)
    completion = text_field(record.get("completion"), "completion", sink)
    if sink.failed:
        return None
    # Trained as a one-turn chat so the prompt format matches what chat/generate send later.
    extra = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    return Example((Message("user", prompt), Message("assistant", completion, True)), extra=extra)


# --- Alpaca: instruction / input / output ------------------------------------------------------

def _parse_alpaca(record: dict, sink: IssueSink) -> Example | None:
    instruction = text_field(record.get("instruction"), "instruction", sink)
    context = record.get("input", "")
    context = text_field(context, "input", sink, allow_empty=True) if context is not None else ""
    output = text_field(record.get("output"), "output", sink)
    system = record.get("system")
    if system is not None:
        system = text_field(system, "system", sink)
    if sink.failed:
        return None
    user = f"{instruction}\n\n{context}" if context and context.strip() else instruction
    messages = ([Message("system", system)] if system else []) + [
        Message("user", user), Message("assistant", output, True)]
    return Example(tuple(messages))


# --- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} -------------

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}


def _parse_sharegpt(record: dict, sink: IssueSink) -> Example | None:
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        sink.error("conversations", "must be a non-empty list of turns",
                   'e.g. [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]')
        return None
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            sink.error(where, "must be an object with from and value")
            continue
        role = _SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            sink.error(f"{where}.from", f"unknown speaker {turn.get('from')!r}",
                       "use human, gpt or system")
            continue
        value = text_field(turn.get("value"), f"{where}.value", sink)
        if value is not None:
            messages.append(Message(role, value, role == "assistant"))
    return None if sink.failed else Example(tuple(messages))


# --- raw text -----------------------------------------------------------------------------------

def _parse_text(record: dict, sink: IssueSink) -> Example | None:
    text = text_field(record.get("text"), "text", sink)
    return None if sink.failed else Example(text=text)


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> None:
    FORMATS[fmt.name] = fmt


_MESSAGES_FIELD = {"chat": "messages", "sharegpt": "conversations"}


def messages_field(format_name: str) -> str:
    return _MESSAGES_FIELD.get(format_name, "")


# Order matters for detection: the first format whose keys a record has wins.
for _fmt in (
    Format("chat", '{"messages": [{"role", "content", "weight"?}]} (OpenAI)',
           lambda r: "messages" in r, _parse_chat),
    Format("sharegpt", '{"conversations": [{"from", "value"}]}',
           lambda r: "conversations" in r, _parse_sharegpt),
    Format("alpaca", '{"instruction", "input"?, "output"}',
           lambda r: "instruction" in r and "output" in r, _parse_alpaca),
    Format("prompt_completion", '{"prompt", "completion"}',
           lambda r: "prompt" in r and "completion" in r, _parse_prompt_completion),
    Format("text", '{"text"}', lambda r: "text" in r, _parse_text),
):
    register_format(_fmt)


def detect_format(record: dict) -> str | None:
    for fmt in FORMATS.values():
        if fmt.detect(record):
            return fmt.name
    return None


def formats_help() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())


def format_family(name: str | None) -> str:
    return FORMATS[name].family if name in FORMATS else "sft"


# Preference pairs (OpenAI's DPO lines, prompt/chosen/rejected) register themselves here.
from afinar.data import preference_formats  # noqa: E402,F401
