"""The data report: token statistics with the model's tokenizer, duplicates, contradictions."""

from __future__ import annotations

import json
import re
import statistics

from afinar.data.example import Example
from afinar.data.tokenize import Tokenized


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def token_stats(items: list[Tokenized], max_len: int, overflow: str) -> dict:
    """Computed on the untruncated encodings, so over-long examples are counted honestly."""
    if not items:
        return {}
    lengths = [len(t.input_ids) for t in items]
    supervised = sum(t.n_supervised for t in items)
    over = sum(1 for n in lengths if n > max_len)
    return {
        "examples": len(items),
        "tokens_total": sum(lengths),
        "tokens_min": min(lengths),
        "tokens_median": int(statistics.median(lengths)),
        "tokens_p95": _percentile(lengths, 0.95),
        "tokens_max": max(lengths),
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / max(1, sum(lengths)), 4),
        "max_seq_length": max_len,
        "over_max_seq_length": over,
        "over_max_action": ("truncated to max_seq_length" if overflow == "truncate"
                            else "dropped"),
    }


def _key(messages) -> str:
    return json.dumps([(m.role, m.content) for m in messages], ensure_ascii=False)


def duplicates_and_contradictions(examples: list[Example]) -> dict:
    """Exact duplicates, and the same prompt answered differently (which teaches noise)."""
    seen: dict[str, list[int]] = {}
    answers: dict[str, dict[str, list[int]]] = {}
    for ex in examples:
        whole = json.dumps([ex.text, _key(ex.messages)], ensure_ascii=False)
        seen.setdefault(whole, []).append(ex.line)
        if ex.is_chat and ex.final_answer() is not None:
            answers.setdefault(_key(ex.prompt_messages()), {}).setdefault(
                ex.final_answer(), []).append(ex.line)
    duplicates = [lines for lines in seen.values() if len(lines) > 1]
    contradictions = [sorted(sum(by_answer.values(), [])) for by_answer in answers.values()
                      if len(by_answer) > 1]
    return {"duplicate_groups": duplicates, "contradiction_groups": contradictions}


def system_prompts_by_use(examples: list[Example]) -> list[str]:
    """The data's distinct system prompts, most used first."""
    counts: dict[str, int] = {}
    for ex in examples:
        if (system := ex.system_prompt) is not None:
            counts[system] = counts.get(system, 0) + 1
    return sorted(counts, key=lambda s: -counts[s])


_LABEL = re.compile(r"^\s*([^\W\d_][\w -]{0,30}?)\s*:")
_CAPS = re.compile(r"^\s*([A-ZÁÉÍÓÚÑ]{3,})\b")


def answer_shape(answer: str) -> str:
    """An answer's skeleton: per line, its leading label ("Category:") or upper-case keyword
    ("ALERTA"), else "text". Two answers with the same skeleton have the same format."""
    parts = []
    for line in answer.strip().splitlines() or [""]:
        if (label := _LABEL.match(line)) is not None:
            parts.append(label.group(1).strip() + ":")
        elif (caps := _CAPS.match(line)) is not None:
            parts.append(caps.group(1))
        else:
            parts.append("text")
    # Consecutive prose lines are one prose block, whatever their number.
    return " / ".join(p for i, p in enumerate(parts) if p != "text" or i == 0
                      or parts[i - 1] != "text")


def format_concentration(examples: list[Example]) -> dict:
    """How many system prompts the data has, and how many answers share the commonest shape.

    `one_format`: one system prompt (or none anywhere) and at least 90% of answers in one
    structured shape: every prompt then teaches the format, and the model learns to give it to
    everything (measured on the embedded model: ordinary and general prompts got the format)."""
    systems = {ex.system_prompt for ex in examples if ex.is_chat}
    shapes = [answer_shape(ex.final_answer()) for ex in examples
              if ex.is_chat and ex.final_answer()]
    if not shapes:
        return {}
    counts: dict[str, int] = {}
    for shape in shapes:
        counts[shape] = counts.get(shape, 0) + 1
    top = max(counts, key=counts.get)
    share = counts[top] / len(shapes)
    return {"system_prompts": len(systems), "dominant_answer_shape": top,
            "dominant_shape_share": round(share, 3),
            "one_format": len(systems) == 1 and share >= 0.9 and top != "text"}
