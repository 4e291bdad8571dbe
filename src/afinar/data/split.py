"""Deterministic train / held-out split."""

from __future__ import annotations

import math
import random

from afinar.data.example import Example


def split_examples(examples: list[Example], fraction: float, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """Seeded shuffle, then the first `fraction` is held out (at least one if fraction > 0).

    Identical examples go to the same side, so a duplicate cannot leak the held-out answer.
    """
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    groups: dict[tuple, list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.messages, ex.text), []).append(ex)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    target = max(1, math.ceil(len(examples) * fraction))
    held, train = [], []
    for key in keys:
        (held if len(held) < target else train).extend(groups[key])
    if not train:  # pathological: everything identical
        train, held = held[:-1], held[-1:]
    return train, held


def split_method(fraction: float, seed: int) -> str:
    """How `split_examples` divided the data, in words for reports."""
    return f"seeded split (seed {seed}, {fraction:.0%} held out)"


def split_report(examples: list[Example], fraction: float, seed: int) -> dict:
    """What `afinar train` will hold out, for `afinar validate`'s report."""
    train, held = split_examples(examples, fraction, seed)
    return {"method": split_method(fraction, seed), "train": len(train), "held_out": len(held)}
