"""The guides' consistency checks on a data set, and advice stated as measured signals.

    found = check_consistency(examples)   # {"stats": {...}, "issues": [Issue...], "advice": [...]}

"Keep tone, structure and length consistent; remove contradictions": each check measures the
answers and points at the lines that break the data set's own pattern:
- length: answers far longer or shorter (in words) than the data set's middle half;
- structure: the dominant answer shape (labelled lines, see stats.answer_shape), bullets, a
  fixed opening; answers that break a shape most answers share;
- contradictions: near-identical prompts (>= 90% similar, the same numbers) whose answers
  disagree (< 60% similar).
Advice names the signal behind it: answers that look like facts to recall (many distinct numbers
and names per answer, little shared structure), where the guides recommend retrieval. (Too few
examples is validation's own warning.)
"""

from __future__ import annotations

import re
import statistics
from collections import Counter

from afinar.data.dedupe import example_text, normalise, similar_pairs
from afinar.data.example import Example
from afinar.data.issues import Issue
from afinar.data.stats import answer_shape

LISTED = 8  # lines named per finding; the count says how many there are in all
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_NAME = re.compile(r"(?<![.!?¿¡]\s)(?<!^)\b[A-ZÁÉÍÓÚÑ][\wáéíóúñ]+")
SHAPE_SHARE = 0.6  # a shape this common is the data set's format; the rest break it
PROMPT_SIMILAR, ANSWER_DIFFERENT = 0.9, 0.6
FACTS_PER_ANSWER, FACT_SHAPE_SHARE = 0.75, 0.3
MAX_PAIRWISE = 20_000


def _lines(examples: list[Example]) -> str:
    shown = ", ".join(str(ex.line) for ex in examples[:LISTED])
    return shown + (f" and {len(examples) - LISTED} more" if len(examples) > LISTED else "")


def _answered(examples: list[Example]) -> list[tuple[Example, str]]:
    return [(ex, ex.final_answer()) for ex in examples if ex.is_chat and ex.final_answer()]


def _length(answered, path: str) -> tuple[dict, list[Issue]]:
    words = [len(answer.split()) for _, answer in answered]
    q1, median, q3 = (statistics.quantiles(words, n=4) if len(words) >= 4
                      else (min(words), statistics.median(words), max(words)))
    stats = {"answer_words_median": median, "answer_words_p25": q1, "answer_words_p75": q3,
             "answer_words_min": min(words), "answer_words_max": max(words)}
    # Tukey's fences on the middle half, widened for short answers (3 vs 6 words is no outlier).
    spread = max(q3 - q1, 0.5 * median, 4)
    long = [ex for (ex, _), n in zip(answered, words) if n > q3 + 3 * spread]
    short = [ex for (ex, _), n in zip(answered, words) if n < q1 - 3 * spread]
    issues = []
    if long:
        issues.append(Issue(path, long[0].line, "answer", f"{len(long)} answer(s) far longer than "
                            f"the rest (most have {q1:.0f}-{q3:.0f} words): lines {_lines(long)}",
                            "keep answers a consistent length, or the model's length becomes "
                            "unpredictable", "warning"))
    if short:
        issues.append(Issue(path, short[0].line, "answer", f"{len(short)} answer(s) far shorter "
                            f"than the rest (most have {q1:.0f}-{q3:.0f} words): lines "
                            f"{_lines(short)}", "check they are complete", "warning"))
    return stats, issues


def _structure(answered, path: str) -> tuple[dict, list[Issue]]:
    shapes = [answer_shape(answer) for _, answer in answered]
    top, count = Counter(shapes).most_common(1)[0]
    share = count / len(shapes)
    bullets = sum(any(_BULLET.match(line) for line in a.splitlines()) for _, a in answered)
    openings = Counter(normalise(a).split(" ")[0] for _, a in answered)
    opening, opening_count = openings.most_common(1)[0]
    stats = {"dominant_answer_shape": top, "dominant_shape_share": round(share, 3),
             "answers_with_bullets": bullets, "answers_multiline": sum(
                 "\n" in a.strip() for _, a in answered),
             "commonest_opening": opening, "commonest_opening_share": round(
                 opening_count / len(answered), 3)}
    issues = []
    if top != "text" and SHAPE_SHARE <= share < 1:
        breaking = [ex for (ex, _), shape in zip(answered, shapes) if shape != top]
        issues.append(Issue(path, breaking[0].line, "answer", f"{len(breaking)} answer(s) break "
                            f"the format {share:.0%} of answers share ({top!r}): lines "
                            f"{_lines(breaking)}", "give every answer the same structure, or "
                            "the model learns it only partly", "warning"))
    return stats, issues


def _contradictions(examples: list[Example], path: str) -> tuple[int | None, list[Issue]]:
    chats = [ex for ex in examples if ex.is_chat and ex.final_answer()]
    if len(chats) > MAX_PAIRWISE:
        return None, []  # all-pairs similarity: ~2.5 s for 5,000 here, quadratic beyond
    prompts = [example_text(ex, "prompt") for ex in chats]
    pairs = similar_pairs(prompts, PROMPT_SIMILAR)
    from rapidfuzz import fuzz

    found = []
    numbers = [_NUMBER.findall(text) for text in prompts]
    for i, later in pairs.items():
        for j, _ in later:
            if numbers[i] != numbers[j]:
                continue  # "order 12" and "order 13" are different questions however alike
            a, b = normalise(chats[i].final_answer()), normalise(chats[j].final_answer())
            if fuzz.ratio(a, b) < ANSWER_DIFFERENT * 100:
                found.append((chats[i], chats[j]))
    issues = [Issue(path, a.line, "answer", f"contradicts line {b.line}: the same question "
                    "(or nearly) with a different answer", "keep one answer per question; "
                    "contradictions teach noise", "warning") for a, b in found[:LISTED]]
    return len(found), issues


def _fact_signal(answered, structure: dict) -> dict:
    """Distinct numbers and capitalised words inside sentences, per answer, and how much
    structure the answers share: a labelled shape, or for prose the commonest opening word."""
    facts = set()
    for _, answer in answered:
        facts.update(_NUMBER.findall(answer))
        facts.update(m.group(0) for line in answer.splitlines() for m in _NAME.finditer(line))
    per_answer = len(facts) / len(answered)
    shared = (structure["dominant_shape_share"] if structure["dominant_answer_shape"] != "text"
              else structure["commonest_opening_share"])
    return {"distinct_facts": len(facts), "facts_per_answer": round(per_answer, 2),
            "shared_structure": shared,
            "looks_like_recall": per_answer >= FACTS_PER_ANSWER and shared < FACT_SHAPE_SHARE}


def check_consistency(examples: list[Example], path: str = "") -> dict:
    answered = _answered(examples)
    if len(answered) < 3:
        return {"stats": {}, "issues": [], "advice": []}
    length_stats, issues = _length(answered, path)
    structure_stats, structure_issues = _structure(answered, path)
    contradictions, contradiction_issues = _contradictions(examples, path)
    facts = _fact_signal(answered, structure_stats)
    advice = []
    if facts["looks_like_recall"]:
        advice.append(
            f"the answers look like facts to recall: {facts['distinct_facts']} distinct numbers "
            f"and names ({facts['facts_per_answer']:.1f} per answer) and little shared structure "
            f"(the commonest shape or opening covers {facts['shared_structure']:.0%} of "
            "answers). Fine-tuning teaches a behaviour or format more reliably than facts; for "
            "facts that must be exact the guides recommend retrieval (RAG), or both. See whether "
            "a prompt does it: `afinar eval RUN --baseline fewshot`.")
    return {"stats": {**length_stats, **structure_stats, "near_contradictions": contradictions,
                      **facts},
            "issues": issues + structure_issues + contradiction_issues, "advice": advice}


def add_to_report(report) -> dict:
    """Runs the checks on a ValidationReport's examples: their warnings join its issues, their
    numbers and advice its stats (`consistency`, `advice`)."""
    found = check_consistency(report.examples, report.path)
    report.issues.extend(found["issues"])
    report.stats.update(consistency=found["stats"], advice=found["advice"])
    return found
