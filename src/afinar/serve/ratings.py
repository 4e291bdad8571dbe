"""Blind A/B ratings (the dashboard's Rate page) turned into preference pairs. No HTTP here.

A rating is one prompt answered by two models, with the rater's verdict in terms of the models:
"a" or "b" (that model's answer is better), "tie", or "both_bad"; optionally an edited ideal
answer. Each rating gives zero or more (chosen, rejected) pairs:

- "a"/"b": chosen = the winner's answer (or the ideal, when given), rejected = the loser's;
- "tie"/"both_bad" with an ideal: chosen = the ideal, and each of the two answers is rejected
  once (two pairs);
- "tie"/"both_bad" without an ideal: nothing to learn, no pair.

A pair whose two sides are equal (after strip), or with an empty side, is skipped: afinar's
validator rejects those lines, and the export must always pass `afinar validate`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from afinar.serve.errors import ApiError

VERDICTS = ("a", "b", "tie", "both_bad")
FORMATS = ("openai", "preference")
_ROLES = ("system", "developer", "user", "assistant")
_OTHER = {"a": "b", "b": "a"}


@dataclass(frozen=True)
class Export:
    """The export's lines and what it says about the ratings it came from."""

    lines: list[str]
    ratings: int
    skipped: dict[str, int]

    @property
    def pairs(self) -> int:
        return len(self.lines)

    def text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def summary(self) -> dict:
        return {"ratings": self.ratings, "pairs": self.pairs, "skipped": self.skipped}


def check_prompt(messages: list[dict]) -> None:
    """400s for a prompt whose pairs the validator would refuse: it must hold non-empty text
    turns and end with the user's turn (the two answers reply to it)."""
    if not messages:
        raise ApiError(400, "messages: give at least the user's message.", param="messages")
    for i, message in enumerate(messages):
        if message["role"] not in _ROLES:
            raise ApiError(400, f"messages[{i}].role: must be one of {', '.join(_ROLES)}.",
                           param=f"messages.[{i}].role")
        if not message["content"].strip():
            raise ApiError(400, f"messages[{i}].content: is empty.",
                           param=f"messages.[{i}].content")
    if messages[-1]["role"] != "user":
        raise ApiError(400, "messages: the prompt must end with the user's message (the two "
                       "answers reply to it).", param="messages")


def winner(rating: dict) -> str | None:
    """The winning model's name, or None for a tie or both bad."""
    verdict = rating["verdict"]
    return rating[f"model_{verdict}"] if verdict in _OTHER else None


def pairs_of(rating: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """(chosen, rejected) pairs of one rating, and the reasons of the pairs it could not give."""
    verdict, ideal = rating["verdict"], rating.get("ideal") or ""
    ideal = ideal if ideal.strip() else ""  # a blank ideal box is no ideal
    answers = {"a": rating["answer_a"], "b": rating["answer_b"]}
    if verdict in _OTHER:
        candidates = [(ideal or answers[verdict], answers[_OTHER[verdict]])]
    elif ideal:
        candidates = [(ideal, answers["a"]), (ideal, answers["b"])]
    else:
        return [], [f"{verdict.replace('_', ' ')} without an ideal answer"]
    pairs, skipped = [], []
    for chosen, rejected in candidates:
        if not chosen.strip() or not rejected.strip():
            skipped.append("an empty answer")
        elif chosen.strip() == rejected.strip():
            skipped.append("chosen and rejected are the same text")
        else:
            pairs.append((chosen, rejected))
    return pairs, skipped


def line(messages: list[dict], chosen: str, rejected: str, fmt: str) -> dict:
    """One export record, in a format `afinar validate` reads (data/preference_formats.py)."""
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages]
    if fmt == "openai":
        return {"input": {"messages": prompt},
                "preferred_output": [{"role": "assistant", "content": chosen}],
                "non_preferred_output": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def export(ratings: list[dict], fmt: str) -> Export:
    """All ratings (oldest first, so the file reads in the order they were made) as JSONL."""
    if fmt not in FORMATS:
        raise ApiError(400, f"format: must be one of {', '.join(FORMATS)}; got {fmt!r}.",
                       param="format")
    lines, skipped = [], Counter()
    for rating in ratings:
        pairs, reasons = pairs_of(rating)
        skipped.update(reasons)
        lines += [json.dumps(line(rating["messages"], c, r, fmt), ensure_ascii=False)
                  for c, r in pairs]
    return Export(lines, len(ratings), dict(skipped))


def tally(ratings: list[dict]) -> dict:
    """Per model: votes it took part in, wins, losses, ties, both bad."""
    models: dict[str, Counter] = {}
    for rating in ratings:
        for side in ("a", "b"):
            name = rating[f"model_{side}"]
            count = models.setdefault(name, Counter(votes=0, wins=0, losses=0, ties=0,
                                                    both_bad=0))
            count["votes"] += 1
            verdict = rating["verdict"]
            if verdict == side:
                count["wins"] += 1
            elif verdict in _OTHER:
                count["losses"] += 1
            else:
                count["ties" if verdict == "tie" else "both_bad"] += 1
    return {name: dict(count) for name, count in models.items()}


def no_pairs_message(result: Export) -> str:
    reasons = ", ".join(f"{n} × {why}" for why, n in result.skipped.items())
    return (f"No preference pair to export: {result.ratings} rating(s)"
            + (f", skipped: {reasons}" if reasons else "")
            + ". Vote A or B, or write an ideal answer.")
