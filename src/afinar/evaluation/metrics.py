"""Reference-based metrics for one generated answer: exact match, normalised match, ROUGE-L.

    score_answer("Categoría: envío", "categoría:  envío.")  # {"exact_match": 0.0,
                                                           #  "normalized_match": 1.0, "rouge_l": 1.0}

Every metric is in [0, 1], higher is better, so reports can average and compare them alike.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$")
_SPACES = re.compile(r"\s+")
_WORDS = re.compile(r"\w+")


def normalize(text: str) -> str:
    """Case, accents, surrounding punctuation and runs of whitespace do not count."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return _PUNCT_EDGES.sub("", _SPACES.sub(" ", text).strip())


def exact_match(answer: str, reference: str) -> float:
    """Identical after trimming surrounding whitespace (models often end with a newline)."""
    return float(answer.strip() == reference.strip())


def normalized_match(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


class _UnicodeWords:
    """rouge-score's default tokenizer keeps only [a-z0-9] and so splits "Categoría" into
    "categor" and "a"; Spanish (and any non-English) text needs Unicode word characters."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _WORDS.findall(unicodedata.normalize("NFC", text.casefold()))


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), via the rouge-score package."""
    if not answer.strip() and not reference.strip():
        return 1.0
    return float(_rouge_scorer().score(reference, answer)["rougeL"].fmeasure)


# name -> function(answer, reference); the report's columns, in this order.
REFERENCE_METRICS = {
    "exact_match": exact_match,
    "normalized_match": normalized_match,
    "rouge_l": rouge_l,
}


def score_answer(answer: str, reference: str) -> dict[str, float]:
    return {name: fn(answer, reference) for name, fn in REFERENCE_METRICS.items()}
