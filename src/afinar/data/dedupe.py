"""Exact and near duplicates in a data set, by text similarity (rapidfuzz, C++).

    groups = find_duplicates(examples, threshold=0.9)          # whole examples
    groups = find_duplicates(examples, by="prompt")            # the same question asked twice
    kept = drop_duplicates(examples, groups)

Texts are compared after case-folding and collapsing whitespace. Near duplicates are pairs whose
normalised Indel similarity (rapidfuzz's `fuzz.ratio`, 0-100) reaches `threshold` × 100. The first
example of a group is kept; every later one that is a duplicate of it is dropped. The comparison is
all-pairs in blocks (about 1 s for 5,000 short examples here); beyond ~50,000 examples it gets slow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from afinar.data.example import Example

_SPACE = re.compile(r"\s+")
_BLOCK = 512  # rows compared at once: a block × n similarity matrix of bytes


@dataclass
class DuplicateGroup:
    kept: Example
    dropped: list[tuple[Example, float]]  # (example, similarity 0-1); 1.0 = exact

    def to_dict(self) -> dict:
        return {"kept": self.kept.line,
                "dropped": [{"line": ex.line, "similarity": round(score, 3)}
                            for ex, score in self.dropped]}


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text.casefold()).strip()


def example_text(example: Example, by: str = "example") -> str:
    """What is compared: the whole example, or only its question turns (`by="prompt"`; the
    system prompt aside, as it is often the same long text in every example)."""
    if not example.is_chat:
        return normalise(example.text or "")
    messages = ([m for m in example.prompt_messages() if m.role != "system"] if by == "prompt"
                else example.messages)
    text = "\n".join(f"{m.role}: {m.content}" for m in messages)
    if by != "prompt" and example.rejected is not None:
        text += "\nrejected: " + example.rejected
    return normalise(text)


def similar_pairs(texts: list[str], threshold: float) -> dict[int, list[tuple[int, float]]]:
    """For each index i, the later indexes j whose text is at least `threshold` similar."""
    from rapidfuzz import fuzz, process

    cutoff = threshold * 100
    found: dict[int, list[tuple[int, float]]] = {}
    for start in range(0, len(texts), _BLOCK):
        rows = texts[start:start + _BLOCK]
        scores = process.cdist(rows, texts, scorer=fuzz.ratio, score_cutoff=cutoff, workers=-1)
        for r, row in enumerate(scores):
            i = start + r
            later = [(j, float(row[j]) / 100) for j in (row[i + 1:] >= cutoff).nonzero()[0] + i + 1]
            if later:
                found[i] = later
    return found


def find_duplicates(examples: list[Example], threshold: float = 0.9,
                    by: str = "example") -> list[DuplicateGroup]:
    if not 0 < threshold <= 1:
        raise ValueError("threshold is a similarity between 0 and 1, e.g. 0.9")
    texts = [example_text(ex, by) for ex in examples]
    pairs = similar_pairs(texts, threshold) if threshold < 1 else _exact_pairs(texts)
    dropped: set[int] = set()
    groups = []
    for i in range(len(examples)):
        if i in dropped or i not in pairs:
            continue
        members = [(j, score) for j, score in pairs[i] if j not in dropped]
        if members:
            dropped.update(j for j, _ in members)
            groups.append(DuplicateGroup(examples[i], [(examples[j], 1.0 if texts[i] == texts[j]
                                                        else score) for j, score in members]))
    return groups


def _exact_pairs(texts: list[str]) -> dict[int, list[tuple[int, float]]]:
    first: dict[str, int] = {}
    found: dict[int, list[tuple[int, float]]] = {}
    for j, text in enumerate(texts):
        if text in first:
            found.setdefault(first[text], []).append((j, 1.0))
        else:
            first[text] = j
    return found


def drop_duplicates(examples: list[Example], groups: list[DuplicateGroup]) -> list[Example]:
    gone = {id(ex) for group in groups for ex, _ in group.dropped}
    return [ex for ex in examples if id(ex) not in gone]
