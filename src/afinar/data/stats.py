"""The data report: token statistics with the model's tokenizer, duplicates, contradictions."""

from __future__ import annotations

import json
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
