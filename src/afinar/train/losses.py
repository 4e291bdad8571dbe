"""Pure loss functions.

The language-model head is applied only at positions that carry a label, in chunks recomputed
during backward: with a 49k-token vocabulary the full logits tensor dominates activation memory,
and most positions (the prompt) need no logits at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from afinar.data.tokenize import IGNORE

CHUNK_ROWS = 1024


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
              softcap: float | None, token_weights: torch.Tensor | None = None):
    logits = F.linear(hidden, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if token_weights is None:
        loss = F.cross_entropy(logits, targets, reduction="sum")
    else:
        loss = (F.cross_entropy(logits, targets, reduction="none") * token_weights).sum()
    correct = (logits.argmax(-1) == targets).sum()
    return loss, correct


def supervised_ce(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Linear,
                  softcap: float | None = None, weights: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of token losses, number of target tokens, number predicted correctly).

    Returning the sum, not the mean, lets the caller normalise by the target tokens of the whole
    accumulated batch: a micro-batch-mean would over-weight tokens in short micro-batches.
    `weights` (one per label position, as labels) scale each token's loss, and the count is
    then their sum.
    """
    targets = labels[:, 1:]
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]
    targets = targets[keep]
    token_weights = None
    if weights is not None:
        token_weights = weights[:, 1:].to(torch.float32)[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, rows.shape[0], CHUNK_ROWS):
        args = (rows[start:start + CHUNK_ROWS], head.weight, head.bias,
                targets[start:start + CHUNK_ROWS], softcap,
                None if token_weights is None else token_weights[start:start + CHUNK_ROWS])
        if torch.is_grad_enabled():
            loss, right = checkpoint(_chunk_ce, *args, use_reentrant=False)
        else:
            loss, right = _chunk_ce(*args)
        total = total + loss
        correct = correct + right
    count = keep.sum() if token_weights is None else token_weights.sum()
    return total, count, correct


class SupervisedLoss(torch.nn.Module):
    """Wraps a causal LM (plain or peft) so that forward returns supervised_ce's triple.

    Being one nn.Module, it is what accelerate/DDP wraps, so gradient sync still happens.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._backbone = [base.get_decoder()]  # lists: keep them out of the module tree
        self._head = [base.get_output_embeddings()]
        self.softcap = getattr(base.config, "final_logit_softcapping", None)

    def forward(self, input_ids, attention_mask, labels, weights=None):
        out = self._backbone[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return supervised_ce(out[0], labels, self._head[0], self.softcap, weights)
