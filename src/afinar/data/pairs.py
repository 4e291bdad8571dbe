"""Preference pairs as token ids: the chosen and the rejected conversation, one shared prompt.

    pair = encode_pair(encoder, example, index)     # both sides through the SFT encoder
    pair = fit_pair(pair, max_len, overflow)        # prompt cut from the left; answers never

Both sides are encoded by `ChatEncoder.encode`, so their masks are the SFT masks (one BOS, the
end-of-turn token trained) and the prompt tokens are identical on both sides.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from afinar.data.example import Example
from afinar.data.tokenize import IGNORE, ChatEncoder, TemplateError, Tokenized

# One side systematically longer: DPO then learns "longer/shorter is better" as much as the style.
LENGTH_BIAS_SHARE = 0.8
LENGTH_BIAS_RATIO = 1.3


@dataclass
class PairTokenized:
    chosen: Tokenized
    rejected: Tokenized
    index: int
    prompt_tokens: int
    truncated: bool = False
    # The reference model's summed answer log-probs (chosen, rejected), set by training.
    reference: tuple[float, float] | None = None

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))

    def sides(self) -> tuple[Tokenized, Tokenized]:
        return self.chosen, self.rejected


def _first_label(item: Tokenized) -> int:
    return next(i for i, label in enumerate(item.labels) if label != IGNORE)


def encode_pair(encoder: ChatEncoder, example: Example, index: int = 0) -> PairTokenized:
    chosen = encoder.encode(example, index)
    rejected = encoder.encode(example.rejected_example(), index)
    start = _first_label(chosen)
    if _first_label(rejected) != start or chosen.input_ids[:start] != rejected.input_ids[:start]:
        raise TemplateError(f"{example.where}: the chat template renders the prompt differently "
                            "before the chosen and the rejected answer",
                            "use a model whose template does not depend on the answer")
    return PairTokenized(chosen, rejected, index, start)


def encode_pairs(examples: list[Example], encoder: ChatEncoder) -> list[PairTokenized]:
    return [encode_pair(encoder, ex, i) for i, ex in enumerate(examples)]


def _cut_prompt(item: Tokenized, cut: int) -> Tokenized:
    return replace(item, input_ids=item.input_ids[cut:], labels=item.labels[cut:], truncated=True)


def fit_pair(pair: PairTokenized, max_len: int, overflow: str) -> PairTokenized | None:
    """Applies max_seq_length to a pair: the prompt loses tokens from its start (its end, next
    to the answers, matters most); the answers are never cut. None: dropped (overflow=drop, or
    the answers alone do not fit with one prompt token)."""
    excess = pair.length - max_len
    if excess <= 0:
        return pair
    if overflow == "drop" or excess > pair.prompt_tokens - 1:
        return None
    return PairTokenized(_cut_prompt(pair.chosen, excess), _cut_prompt(pair.rejected, excess),
                         pair.index, pair.prompt_tokens - excess, True, pair.reference)


def reindexed(pair: PairTokenized, index: int) -> PairTokenized:
    return replace(pair, index=index, chosen=replace(pair.chosen, index=index),
                   rejected=replace(pair.rejected, index=index))


def pair_stats(pairs: list[PairTokenized], max_len: int, overflow: str) -> dict:
    """Answer lengths of each side, and what max_seq_length does to the pairs (computed on the
    untruncated encodings)."""
    if not pairs:
        return {}
    chosen = [p.chosen.n_supervised for p in pairs]
    rejected = [p.rejected.n_supervised for p in pairs]
    longer = sum(1 for c, r in zip(chosen, rejected) if c > r)
    shorter = sum(1 for c, r in zip(chosen, rejected) if c < r)
    fitted = [fit_pair(p, max_len, overflow) for p in pairs]
    return {
        "pairs": len(pairs),
        "chosen_answer_tokens_mean": round(statistics.fmean(chosen), 1),
        "rejected_answer_tokens_mean": round(statistics.fmean(rejected), 1),
        "chosen_longer_share": round(longer / len(pairs), 3),
        "chosen_shorter_share": round(shorter / len(pairs), 3),
        "pairs_prompt_truncated": sum(1 for f in fitted if f is not None and f.truncated),
        "pairs_dropped_by_length": sum(1 for f in fitted if f is None),
    }


def length_bias_warning(stats: dict) -> str | None:
    """A warning when one side is systematically longer than the other."""
    if not stats:
        return None
    c, r = stats["chosen_answer_tokens_mean"], stats["rejected_answer_tokens_mean"]
    for share, side, ratio in ((stats["chosen_longer_share"], "chosen", c / max(r, 1e-9)),
                               (stats["chosen_shorter_share"], "rejected", r / max(c, 1e-9))):
        if share >= LENGTH_BIAS_SHARE and ratio >= LENGTH_BIAS_RATIO:
            other = "rejected" if side == "chosen" else "chosen"
            return (f"the {side} answer is longer in {share:.0%} of the pairs ({max(c, r):.0f} "
                    f"vs {min(c, r):.0f} tokens on average): DPO then learns length as much as "
                    f"quality, and the tuned model's answers drift {'longer' if side == 'chosen' else 'shorter'}; "
                    f"add pairs where the {other} answer is the longer one")
    return None
