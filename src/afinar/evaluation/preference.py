"""The preference part of an evaluation: how each model ranks the held-out pairs' answers.

    logps = pair_log_probs(loaded, examples, max_len)      # per pair: chosen/rejected sums, lengths
    section = preference_section(model_logps, base_logps, beta, model_answers, base_answers)

Two measures, both on held-out pairs:
- preference accuracy: the share of pairs whose chosen answer has the higher mean per-token
  log-prob under the model (per token, so a longer answer is not penalised for its length); the
  same number for the base model says where training started;
- reward accuracy and margin (DPO's own numbers): rewards are beta x the log-prob change from
  the reference, here the baseline the run started from; the base model scores 0 by definition.
"""

from __future__ import annotations

import statistics

import torch

from afinar.data.batching import collate
from afinar.data.example import Example
from afinar.data.pairs import encode_pair, fit_pair
from afinar.losses.preference import TIE_TOLERANCE, AnswerLogProbs


@torch.no_grad()
def pair_log_probs(loaded, examples: list[Example], max_len: int, batch_size: int = 16
                   ) -> list[tuple[float, float, int, int] | None]:
    """(chosen sum, rejected sum, chosen tokens, rejected tokens) per pair example (None for a
    pair that does not fit max_len), in the examples' order."""
    pairs = [fit_pair(encode_pair(loaded.encoder, ex, i), max_len, "truncate")
             if ex.is_preference else None for i, ex in enumerate(examples)]
    module = AnswerLogProbs(loaded.model).eval()
    pad = loaded.tokenizer.pad_token_id
    out: list[tuple[float, float, int, int] | None] = [None] * len(examples)
    ready = [i for i, p in enumerate(pairs) if p is not None]
    for start in range(0, len(ready), batch_size):
        group = ready[start:start + batch_size]
        batch = collate([pairs[i].chosen for i in group] + [pairs[i].rejected for i in group],
                        pad)
        sums, counts = module(**{k: v.to(loaded.device) for k, v in batch.items()})
        sums, counts = sums.float().cpu().tolist(), counts.cpu().tolist()
        n = len(group)
        for j, i in enumerate(group):
            out[i] = (sums[j], sums[n + j], counts[j], counts[n + j])
    return out


def _ranking(values: list[tuple]) -> dict:
    gaps = [c / max(1, nc) - r / max(1, nr) for c, r, nc, nr in values]
    return {"preference_accuracy": sum(g > 0 for g in gaps) / len(gaps),
            "preference_margin": statistics.fmean(gaps)}


def _words(answers: list[str]) -> float:
    return statistics.fmean(len(a.split()) for a in answers) if answers else 0.0


def preference_section(model: list, base: list | None, beta: float, model_answers: list[str],
                       base_answers: list[str] | None) -> dict:
    """The report's `preference` part; `model`/`base` from pair_log_probs."""
    keep = [i for i, v in enumerate(model) if v is not None
            and (base is None or base[i] is not None)]
    if not keep:
        return {}
    mine = [model[i] for i in keep]
    out = {"pairs": len(keep), "beta": beta,
           "model": {**_ranking(mine), "answer_words": round(_words(model_answers), 1)}}
    if base is not None:
        theirs = [base[i] for i in keep]
        out["baseline"] = {**_ranking(theirs),
                           "answer_words": round(_words(base_answers or []), 1)}
        gaps = [(m[0] - b[0]) - (m[1] - b[1]) for m, b in zip(mine, theirs)]
        out["model"]["reward_accuracy"] = sum(g > TIE_TOLERANCE for g in gaps) / len(gaps)
        out["model"]["reward_ties"] = sum(abs(g) <= TIE_TOLERANCE for g in gaps) / len(gaps)
        out["model"]["reward_margin"] = beta * statistics.fmean(gaps)
        out["model"]["chosen_logp_change"] = statistics.fmean(m[0] - b[0]
                                                              for m, b in zip(mine, theirs))
        out["model"]["rejected_logp_change"] = statistics.fmean(m[1] - b[1]
                                                                for m, b in zip(mine, theirs))
    return out


def preference_metrics(section: dict) -> list[dict]:
    """Rows for the report's metric table (base vs tuned)."""
    if not section:
        return []
    rows = []
    base = section.get("baseline") or {}
    for name in ("preference_accuracy", "preference_margin", "reward_accuracy", "reward_margin"):
        value = section["model"].get(name)
        if value is None:
            continue
        base_value = base.get(name, 0.0 if name.startswith("reward") and base else None)
        rows.append({"name": name, "model": value, "baseline": base_value,
                     "delta": None if base_value is None else value - base_value,
                     "n": section["pairs"], "better": "higher"})
    return rows


def preference_markdown(section: dict) -> list[str]:
    if not section:
        return []
    model, base = section["model"], section.get("baseline")
    lines = ["", "## Preference pairs", "",
             f"{section['pairs']} held-out pairs. Preference accuracy: the share whose chosen "
             "answer has the higher per-token log-prob."]
    text = (f"Tuned: {model['preference_accuracy']:.0%}"
            + (f" (base {base['preference_accuracy']:.0%})" if base else ""))
    if "reward_accuracy" in model:
        text += (f"; against the base as reference (DPO's reward, beta {section['beta']}): "
                 f"accuracy {model['reward_accuracy']:.0%}, margin {model['reward_margin']:.3f}, "
                 f"log-prob change chosen {model['chosen_logp_change']:+.2f}, rejected "
                 f"{model['rejected_logp_change']:+.2f}")
    lines.append(text + ".")
    lines.append(f"Greedy answers: {model['answer_words']:.1f} words on average"
                 + (f" (base {base['answer_words']:.1f})." if base else "."))
    return lines
