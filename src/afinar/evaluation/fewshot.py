"""The prompting baseline: would a prompt have done it? `afinar eval RUN --baseline fewshot[:K]`
scores the run's base model prompted with K of the run's TRAINING examples (never a held-out
one) and the training data's system prompt, on the same held-out prompts as the tuned model.

    shots = pick_shots(train_examples, k=5, seed=42)
    prompt = with_shots(held_out_example, shots, system)   # an Example; only its answer trains

The shots go in as earlier user/assistant turns (the way chat models are few-shot prompted),
after one system prompt: the held-out example's own, else the training data's commonest.
"""

from __future__ import annotations

import random
import re

from afinar.data.example import Example, Message
from afinar.data.stats import system_prompts_by_use
from afinar.errors import AfinarError

DEFAULT_SHOTS = 5
_SPEC = re.compile(r"fewshot(?::(\d+))?")


def parse_fewshot(baseline: str | None) -> int | None:
    """`fewshot` → 5, `fewshot:3` → 3, anything else → None."""
    match = _SPEC.fullmatch(baseline or "")
    if match is None:
        return None
    k = int(match.group(1)) if match.group(1) else DEFAULT_SHOTS
    if not 1 <= k <= 32:
        raise AfinarError(f"--baseline {baseline}: K must be between 1 and 32", "e.g. fewshot:5")
    return k


def pick_shots(train: list[Example], k: int, seed: int) -> list[Example]:
    """K single-question training examples (the shortest prompts cost the least context), in a
    seeded order; multi-turn ones only when there are not enough single-question ones."""
    chats = [ex for ex in train if ex.is_chat and ex.final_answer()]
    single = [ex for ex in chats if sum(m.role == "user" for m in ex.messages) == 1]
    pool = single if len(single) >= k else chats
    if len(pool) < k:
        raise AfinarError(f"the few-shot baseline needs {k} training examples with an answer; "
                          f"the run has {len(pool)}", f"use fewshot:{max(1, len(pool))}")
    return random.Random(seed).sample(pool, k)


def training_system_prompt(train: list[Example]) -> str | None:
    found = system_prompts_by_use(train)
    return found[0] if found else None


def with_shots(example: Example, shots: list[Example], system: str | None) -> Example:
    """The held-out example preceded by the shots; only its own answer is supervised, so the
    baseline's held-out loss covers exactly the tokens the tuned model's does."""
    turns: list[Message] = []
    own_system = example.system_prompt
    if own_system or system:
        turns.append(Message("system", own_system or system))
    for shot in shots:
        turns += [Message(m.role, m.content) for m in shot.messages if m.role != "system"]
    turns += [m for m in example.messages if m.role != "system"]
    return Example(tuple(turns), path=example.path, line=example.line, extra=example.extra,
                   rejected=example.rejected)


def describe(shots: list[Example], system: str | None, sample: Example | None) -> dict:
    """What report.json records about the baseline: which training lines, and one whole prompt."""
    out = {"k": len(shots), "shots": [shot.where for shot in shots], "system_prompt": system}
    if sample is not None:
        out["example_prompt"] = [{"role": m.role, "content": m.content}
                                 for m in sample.prompt_messages()]
    return out
