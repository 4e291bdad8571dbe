"""Preference pairs for DPO and ORPO: a prompt, a preferred answer and a non-preferred one.

Three spellings are read, each into an `Example` whose messages are the prompt and the chosen
answer and whose `rejected` is the other answer:

- OpenAI's DPO lines: {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant",
  ...}], "non_preferred_output": [...]}, each output a list of exactly one assistant message (a
  plain string is an error there, as OpenAI's API makes it);
- {"prompt", "chosen", "rejected"}, each a string or a list of messages;
- implicit prompt: {"chosen", "rejected"} as whole conversations; the prompt is their longest
  shared prefix of turns, and what follows must be one assistant message on each side.

Every problem is reported through the IssueSink with the field it is in, as for SFT formats.
"""

from __future__ import annotations

from afinar.data.example import Example, Message
from afinar.data.format_parts import Format, parse_messages, text_field
from afinar.data.issues import IssueSink

_ONE_ANSWER = 'e.g. [{"role": "assistant", "content": "..."}] or a plain string'
# OpenAI's DPO lines take no plain string: its fine-tuning API rejects a file that has one.
_ONE_MESSAGE = 'write [{"role": "assistant", "content": "..."}]'


def _answer(value, field: str, sink: IssueSink, *, strings: bool = True) -> str | None:
    """One final assistant answer: a list holding exactly one assistant message, or (where
    `strings`, as in prompt/chosen/rejected) a plain string."""
    hint = _ONE_ANSWER if strings else _ONE_MESSAGE
    if strings and (isinstance(value, str) or value is None):
        return text_field(value, field, sink)
    if value is None:
        sink.error(field, "is missing", hint)
        return None
    if isinstance(value, str):
        sink.error(field, "must be a list holding one assistant message, got a string",
                   f"OpenAI's DPO format takes no plain strings here: {hint}")
        return None
    if not isinstance(value, list) or len(value) != 1:
        got = f"{len(value)} messages" if isinstance(value, list) else f"a {type(value).__name__}"
        sink.error(field, f"must be one final assistant message, got {got}", hint)
        return None
    message = value[0]
    where = f"{field}[0]"
    if not isinstance(message, dict):
        sink.error(where, "must be an object with role and content", hint)
        return None
    if message.get("tool_calls") or message.get("function_call"):
        sink.error(where, "tool calls are not supported yet",
                   "remove tool-calling pairs from this file")
        return None
    if message.get("role") != "assistant":
        sink.error(f"{where}.role", f"must be assistant, got {message.get('role')!r}",
                   f"the answers being compared are the assistant's: {_ONE_MESSAGE}")
        return None
    return text_field(message.get("content"), f"{where}.content", sink)


def _prompt(messages: list[Message], field: str, sink: IssueSink) -> tuple[Message, ...] | None:
    """The conversation the answers reply to: it must end with a user turn."""
    if messages[-1].role == "assistant":
        sink.error(f"{field}[{len(messages) - 1}]", "the prompt ends with an assistant turn",
                   "the compared answers must follow a user message; move this answer into "
                   "chosen/rejected or remove it")
        return None
    if not any(m.role == "user" for m in messages):
        sink.error(field, "has no user message", "the prompt needs the user's request")
        return None
    # Only the final answers are compared; earlier turns are context.
    return tuple(Message(m.role, m.content) for m in messages)


def _pair(prompt, chosen: str, rejected: str, rejected_field: str, sink: IssueSink,
          extra: dict) -> Example | None:
    if chosen.strip() == rejected.strip():
        sink.error(rejected_field, "is the same as the preferred answer: the pair teaches "
                   "nothing", "write a worse answer here, or remove the pair")
        return None
    return Example(prompt + (Message("assistant", chosen, True),), rejected=rejected, extra=extra)


def _no_tools(record: dict, field: str, sink: IssueSink) -> None:
    if record.get("tools") or record.get("functions"):
        sink.error(field, "tool definitions are not supported yet", "remove tool-calling pairs")


def _parse_openai_dpo(record: dict, sink: IssueSink) -> Example | None:
    source = record.get("input")
    prompt = None
    if not isinstance(source, dict):
        sink.error("input", "must be an object with messages",
                   'e.g. {"messages": [{"role": "user", "content": "..."}]}')
    else:
        _no_tools(source, "input.tools", sink)
        messages = parse_messages(source.get("messages"), "input.messages", sink)
        if messages and not sink.failed:
            prompt = _prompt(messages, "input.messages", sink)
    chosen = _answer(record.get("preferred_output"), "preferred_output", sink, strings=False)
    rejected = _answer(record.get("non_preferred_output"), "non_preferred_output", sink,
                       strings=False)
    if sink.failed or prompt is None:
        return None
    extra = {k: v for k, v in record.items()
             if k not in ("input", "preferred_output", "non_preferred_output")}
    return _pair(prompt, chosen, rejected, "non_preferred_output", sink, extra)


def _conversation(value, field: str, sink: IssueSink) -> list[Message] | None:
    if not isinstance(value, list):
        sink.error(field, "without a prompt, chosen and rejected must be whole conversations "
                   "(lists of messages)", 'give a "prompt" field, or write both as '
                   '[{"role": "user", ...}, {"role": "assistant", ...}]')
        return None
    return parse_messages(value, field, sink)


def _parse_implicit(record: dict, sink: IssueSink) -> Example | None:
    chosen = _conversation(record.get("chosen"), "chosen", sink)
    rejected = _conversation(record.get("rejected"), "rejected", sink)
    if sink.failed or not chosen or not rejected:
        return None
    shared = 0
    while (shared < min(len(chosen), len(rejected))
           and (chosen[shared].role, chosen[shared].content)
           == (rejected[shared].role, rejected[shared].content)):
        shared += 1
    if shared == len(chosen) == len(rejected):
        sink.error("rejected", "is the same conversation as chosen: the pair teaches nothing",
                   "write a worse final answer in rejected, or remove the pair")
        return None
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        tail = turns[shared:]
        if len(tail) != 1 or tail[0].role != "assistant":
            sink.error(f"{name}[{shared}]", "chosen and rejected differ before their last "
                       "assistant message: the prompt must be the same on both sides",
                       "make both conversations identical up to the final answer, or give an "
                       "explicit \"prompt\"")
            return None
    if shared == 0:
        sink.error("chosen", "has no prompt before the answer", "start with the user message")
        return None
    prompt = _prompt(chosen[:shared], "chosen", sink)
    if prompt is None:
        return None
    extra = {k: v for k, v in record.items() if k not in ("chosen", "rejected")}
    return _pair(prompt, chosen[shared].content, rejected[shared].content, "rejected", sink,
                 extra)


def _parse_prompt_chosen_rejected(record: dict, sink: IssueSink) -> Example | None:
    _no_tools(record, "tools", sink)
    if "prompt" not in record:
        return _parse_implicit(record, sink)
    raw = record.get("prompt")
    prompt = None
    if isinstance(raw, list):
        messages = parse_messages(raw, "prompt", sink)
        if messages and not sink.failed:
            prompt = _prompt(messages, "prompt", sink)
    else:
        text = text_field(raw, "prompt", sink)
        prompt = (Message("user", text),) if text is not None else None
    chosen = _answer(record.get("chosen"), "chosen", sink)
    rejected = _answer(record.get("rejected"), "rejected", sink)
    if sink.failed or prompt is None:
        return None
    extra = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected")}
    return _pair(prompt, chosen, rejected, "rejected", sink, extra)


# formats.py puts these at the end of FORMATS.
PREFERENCE_FORMATS = (
    Format("dpo", '{"input": {"messages"}, "preferred_output", "non_preferred_output"} '
           '(OpenAI DPO)', lambda r: "preferred_output" in r or "non_preferred_output" in r,
           _parse_openai_dpo, family="preference"),
    Format("preference", '{"prompt"?, "chosen", "rejected"} (a prompt with two answers, or two '
           'whole conversations)', lambda r: "chosen" in r and "rejected" in r,
           _parse_prompt_chosen_rejected, family="preference"),
)
