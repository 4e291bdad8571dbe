"""Writes `Example`s back as records of a chosen format: the reverse of data/formats.py, for
`afinar data convert --to FORMAT` and the other `data` commands that produce files.

    record = to_record(example, "sharegpt")      # raises NotExpressible when it cannot be said
    write_jsonl_atomic(path, records)            # temp file + rename: never a half-written file

A format that cannot hold an example (a multi-turn chat as alpaca, a plain chat as a preference
pair) is refused per example with the reason, never flattened silently.
"""

from __future__ import annotations

import json
from pathlib import Path

from afinar import rundir
from afinar.data.example import Example, Message

WRITABLE = ("chat", "sharegpt", "alpaca", "prompt_completion", "text", "dpo", "preference")


class NotExpressible(ValueError):
    """This example cannot be written in that format (the message says why and what to use)."""


def with_system(example: Example, system: str | None) -> Example:
    """The example with `system` as its system prompt when it has none (chats only)."""
    if not system or not example.is_chat or example.system_prompt is not None:
        return example
    return Example((Message("system", system),) + example.messages, path=example.path,
                   line=example.line, extra=example.extra, rejected=example.rejected)


def to_record(example: Example, fmt: str) -> dict:
    if fmt not in WRITABLE:
        raise ValueError(f"cannot write format {fmt!r}; use one of {', '.join(WRITABLE)}")
    if not example.is_chat:
        if fmt != "text":
            raise NotExpressible("a raw text example has no question and answer; keep it as text")
        return {"text": example.text}
    if fmt == "text":
        raise NotExpressible("a conversation needs its roles; write it as chat")
    if fmt in ("dpo", "preference"):
        return _pair_record(example, fmt)
    if example.is_preference:
        # SFT formats keep the preferred answer, as training SFT on a preference file does.
        example = Example(example.messages, path=example.path, line=example.line)
    if fmt == "chat":
        return {"messages": [_chat_message(m) for m in example.messages]}
    if fmt == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m.role], "value": m.content}
                                  for m in example.messages]}
    system, user, answer = _one_turn(example, fmt)
    if fmt == "alpaca":
        record = {"instruction": user, "input": "", "output": answer}
        return {**record, "system": system} if system else record
    if system:
        raise NotExpressible("prompt_completion has no place for a system prompt; use chat")
    return {"prompt": user, "completion": answer}


def _chat_message(message: Message) -> dict:
    out = {"role": message.role, "content": message.content}
    if message.role == "assistant" and not message.train:
        out["weight"] = 0  # context only, as in the source
    return out


def _one_turn(example: Example, fmt: str) -> tuple[str | None, str, str]:
    roles = [m.role for m in example.messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise NotExpressible(f"{fmt} holds one question and its answer; this example has "
                             f"{len(roles)} turns ({', '.join(roles)}): write it as chat")
    system = example.messages[0].content if roles[0] == "system" else None
    return system, example.messages[-2].content, example.messages[-1].content


def _pair_record(example: Example, fmt: str) -> dict:
    if not example.is_preference:
        raise NotExpressible(f"{fmt} needs a chosen and a rejected answer; this example has one "
                             "answer (write SFT data as chat)")
    prompt = [{"role": m.role, "content": m.content} for m in example.prompt_messages()]
    chosen, rejected = example.final_answer(), example.rejected
    if fmt == "dpo":
        return {"input": {"messages": prompt},
                "preferred_output": [{"role": "assistant", "content": chosen}],
                "non_preferred_output": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def jsonl_text(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl_atomic(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    rundir.write_text_atomic(path, jsonl_text(records))
    return path
