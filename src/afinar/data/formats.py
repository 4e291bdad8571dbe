"""Readers for the example formats the fine-tuning guides use, all producing `Example`s.

Each format is one small entry in FORMATS (name, how to recognise a record, how to parse it):
the SFT formats here, the preference pairs from preference_formats.py, built from the pieces
in format_parts.py. Parsers report every problem of a record through an IssueSink instead of
raising, so validation can list them all.
"""

from __future__ import annotations

from afinar.data.example import Example, Message
from afinar.data.format_parts import Format, parse_messages, text_field
from afinar.data.issues import IssueSink
from afinar.data.preference_formats import PREFERENCE_FORMATS


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


_MESSAGES_FIELD = {"chat": "messages", "sharegpt": "conversations"}


def messages_field(format_name: str) -> str:
    return _MESSAGES_FIELD.get(format_name, "")


# Order matters for detection: the first format whose keys a record has wins; preference pairs
# (OpenAI's DPO lines, prompt/chosen/rejected) come last.
FORMATS: dict[str, Format] = {fmt.name: fmt for fmt in (
    Format("chat", '{"messages": [{"role", "content", "weight"?}]} (OpenAI)',
           lambda r: "messages" in r, _parse_chat),
    Format("sharegpt", '{"conversations": [{"from", "value"}]}',
           lambda r: "conversations" in r, _parse_sharegpt),
    Format("alpaca", '{"instruction", "input"?, "output"}',
           lambda r: "instruction" in r and "output" in r, _parse_alpaca),
    Format("prompt_completion", '{"prompt", "completion"}',
           lambda r: "prompt" in r and "completion" in r, _parse_prompt_completion),
    Format("text", '{"text"}', lambda r: "text" in r, _parse_text),
    *PREFERENCE_FORMATS,
)}


def detect_format(record: dict) -> str | None:
    for fmt in FORMATS.values():
        if fmt.detect(record):
            return fmt.name
    return None


def formats_help() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())


def format_family(name: str | None) -> str:
    return FORMATS[name].family if name in FORMATS else "sft"
