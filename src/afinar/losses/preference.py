"""Preference losses (DPO and its variants, ORPO) and the answer log-probabilities they need.

    module = AnswerLogProbs(model)                 # forward -> (summed log-probs, answer tokens)
    loss = dpo_losses(policy_c, policy_r, ref_c, ref_r, beta=0.1)      # one value per pair

A batch holds the chosen sides first and the rejected sides after them, so both go through one
forward pass. Log-probabilities are over answer tokens only (the SFT masks: the end-of-turn
token included, the prompt excluded), in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afinar.data.tokenize import IGNORE
from afinar.losses.supervised import SupervisedLoss, token_log_probs

# Two rewards closer than this (in nats of log-ratio) are a tie, not a win: at step 0 the policy
# is the reference, and the reference's log-probs were computed in other batches, whose padding
# changes the last bits of the sums.
TIE_TOLERANCE = 1e-3


class AnswerLogProbs(SupervisedLoss):
    """Wraps a causal LM (plain or peft) as SupervisedLoss does (same backbone, head and
    softcap): forward returns, per sequence, the summed log-prob of its answer tokens and their
    number. One nn.Module, so accelerate/DDP wrap it as SFT's."""

    def forward(self, input_ids, attention_mask, labels, **_ignored):
        hidden = self._backbone[0](input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False)[0]
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logps = token_log_probs(hidden[:, :-1][keep], targets[keep], self._head[0],
                                self.softcap)
        sequence = keep.nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logps.device)
        return sums.index_add(0, sequence, logps), keep.sum(1)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1,
               loss: str = "sigmoid", label_smoothing: float = 0.0,
               chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """One loss per pair, from summed answer log-probs of the policy and the reference.

    sigmoid: -log σ(β·Δ), Δ = (chosen log-ratio) - (rejected log-ratio); with label smoothing ε,
    conservative DPO: -(1-ε)·log σ(β·Δ) - ε·log σ(-β·Δ). robust: the unbiased form,
    (-(1-ε)·log σ(β·Δ) + ε·log σ(-β·Δ)) / (1-2ε). ipo: (Δ' - 1/(2β))², Δ' from per-token
    log-ratios (each side divided by its answer length)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the answer lengths")
        delta = (chosen_ratio / chosen_tokens.clamp(min=1)
                 - rejected_ratio / rejected_tokens.clamp(min=1))
        return (delta - 1 / (2 * beta)) ** 2
    delta = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    if loss == "sigmoid":
        return -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    if loss == "robust":
        return (-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)
    raise ValueError(f"unknown DPO loss {loss!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """log(odds(chosen) / odds(rejected)), odds(y) = p / (1 - p), from the mean per-token
    log-probs of each answer (ORPO's eq. 4 and 7, in log space)."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    return (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))


def orpo_odds_term(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor) -> torch.Tensor:
    """log σ(log-odds ratio) per pair; ORPO's loss is NLL(chosen) - λ times its mean."""
    return F.logsigmoid(orpo_log_odds(chosen_mean, rejected_mean))
