"""Pure loss functions.

The language-model head is applied only at positions that carry a label: with a 49k-token
vocabulary the logits dominate activation memory, and most positions (the prompt) need no
logits at all. The head and the cross-entropy are fused: each chunk of rows computes its logits,
its loss and, in the same pass, the gradient for the hidden states (and for the head's weight
when it trains), so no logits are kept for the backward pass and none are recomputed
(measured on the embedded model: the recomputing version spent 18% of its matmul time on the
head, a third of it in the recomputation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afinar.data.tokenize import IGNORE

# Rows per chunk: one chunk's fp32 logits (rows x vocabulary) is the loss's transient memory,
# 50 MB for a 49k vocabulary; the head's matmul is as fast at 256 rows as at 1024 here.
CHUNK_ROWS = 256


class FusedHeadCrossEntropy(torch.autograd.Function):
    """(weighted loss of each row, number predicted correctly) of `rows` against `targets`;
    the gradients are computed in the forward pass, chunk by chunk, and only scaled in the
    backward pass (each row's loss is linear in its incoming gradient).

    The head's weight and bias gradients are kept summed over rows, so they are right only when
    every row gets the same incoming gradient (a plain sum of the losses, as SFT uses); a caller
    that weighs rows differently (DPO) uses this only with a frozen head."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, token_weights, softcap):
        need = (rows.requires_grad, weight.requires_grad,
                bias is not None and bias.requires_grad)
        grad_rows = torch.zeros_like(rows) if need[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        row_losses = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        correct = torch.zeros((), dtype=torch.long, device=rows.device)
        # Every matmul runs in the dtype autocast would pick (the rows' own without autocast),
        # with the weight cast ONCE per call: autocast itself would cast a frozen weight again
        # for every chunk (it caches casts of trained leaves only), and a vocabulary-sized head
        # in fp32 made those casts a fifth of a bf16 step on the embedded model (1,122 copies
        # per 3 steps, measured). Same roundings as autocast's, so the same numbers.
        device_type = rows.device.type
        matmul_dtype = (torch.get_autocast_dtype(device_type)
                        if torch.is_autocast_enabled(device_type) else rows.dtype)
        matmul_weight = weight.to(matmul_dtype)
        matmul_bias = None if bias is None else bias.to(matmul_dtype)
        for start in range(0, rows.shape[0], CHUNK_ROWS):
            part = rows[start:start + CHUNK_ROWS]
            target = targets[start:start + CHUNK_ROWS]
            with torch.autocast(device_type, enabled=False):
                logits = F.linear(part.to(matmul_dtype), matmul_weight, matmul_bias).float()
            squash = None
            if softcap:
                squash = torch.tanh(logits / softcap)
                logits = softcap * squash
            best = logits.argmax(-1)
            correct += (best == target).sum()
            picked = logits.gather(1, target[:, None]).squeeze(1)
            scale = None if token_weights is None else token_weights[start:start + CHUNK_ROWS]
            if any(need):
                # One pass of exp over the logits serves the loss and its gradient (logsumexp,
                # then softmax, made two), in place: the logits are not needed after it.
                peak = logits.gather(1, best[:, None]).squeeze(1)
                exp = logits.sub_(peak[:, None]).exp_()
                total = exp.sum(-1)
                losses = peak + total.log() - picked
            else:
                losses = torch.logsumexp(logits, dim=-1) - picked
            row_losses[start:start + CHUNK_ROWS] = losses if scale is None else losses * scale
            if not any(need):
                continue
            # d(loss)/d(logits) = softmax - one-hot, in place over the exponentials.
            grad = exp.div_(total[:, None])
            grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1
            if scale is not None:
                grad *= scale[:, None]
            if squash is not None:
                grad *= 1 - squash * squash
            grad_in = grad.to(matmul_dtype)
            if need[0]:
                grad_rows[start:start + CHUNK_ROWS] = grad_in @ matmul_weight
            if need[1]:
                grad_weight += (grad_in.t() @ part.to(matmul_dtype)).float()
            if need[2]:
                grad_bias += grad.sum(0)
        ctx.grads = (grad_rows, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(correct)
        return row_losses, correct

    @staticmethod
    def backward(ctx, grad_losses, _grad_correct):
        grad_rows, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        if grad_weight is not None or grad_bias is not None:
            if grad_losses.numel() and not bool((grad_losses == grad_losses[0]).all()):
                raise RuntimeError("the fused head's weight gradient needs the same incoming "
                                   "gradient on every row (a plain sum of the losses)")
        uniform = grad_losses[0] if grad_losses.numel() else grad_losses.new_zeros(())
        scaled = [None if grad_rows is None else grad_rows * grad_losses[:, None].to(
            grad_rows.dtype)] + [None if g is None else g * uniform.to(g.dtype)
                                 for g in (grad_weight, grad_bias)]
        if scaled[1] is not None:
            scaled[1] = scaled[1].to(ctx.dtypes[0])
        if scaled[2] is not None:
            scaled[2] = scaled[2].to(ctx.dtypes[1])
        return scaled[0], scaled[1], scaled[2], None, None, None


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
    row_losses, correct = FusedHeadCrossEntropy.apply(rows, head.weight, head.bias, targets,
                                                       token_weights, softcap)
    total = row_losses.sum()
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


def token_log_probs(rows: torch.Tensor, targets: torch.Tensor, head: torch.nn.Linear,
                    softcap: float | None = None) -> torch.Tensor:
    """log p(target) of each row under the head, in fp32, for losses that weigh rows apart
    (DPO, ORPO). A frozen head takes the fused path (no logits kept); a trained one (full
    fine-tuning) plain autograd, whose weight gradient must follow each row's weight."""
    if not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad):
        row_losses, _ = FusedHeadCrossEntropy.apply(rows, head.weight, head.bias, targets,
                                                     None, softcap)
        return -row_losses
    logits = F.linear(rows, head.weight, head.bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
