"""Held-out loss, perplexity and token accuracy on the supervised (assistant) tokens only.

Used by the training loop at every evaluation and by `afinar eval`, so both measure the same
thing with the same masks as training.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from afinar.data.batching import collate
from afinar.data.tokenize import Tokenized


@torch.no_grad()
def evaluate_loss(loss_model, items: list[Tokenized], batch_size: int, pad_id: int,
                  accelerator=None, device: torch.device | None = None) -> dict:
    """`loss_model` is a SupervisedLoss. With an accelerate Accelerator, each process takes its
    share of `items` and the sums are reduced; without one, everything runs on `device`."""
    was_training = loss_model.training
    loss_model.eval()
    rank, world = ((accelerator.process_index, accelerator.num_processes) if accelerator
                   else (0, 1))
    target = accelerator.device if accelerator else (device or torch.device("cpu"))
    autocast = accelerator.autocast if accelerator else nullcontext
    mine = sorted(items[rank::world], key=lambda t: -len(t.input_ids))
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(mine), batch_size):
        batch = collate(mine[start:start + batch_size], pad_id)
        batch = {k: v.to(target) for k, v in batch.items()}
        with autocast():
            loss_sum, count, correct = loss_model(**batch)
        totals += torch.tensor([loss_sum.item(), count.item(), correct.item()], dtype=torch.float64)
    if world > 1:
        totals = accelerator.reduce(totals.to(target), "sum").cpu()
    loss_model.train(was_training)
    loss = (totals[0] / totals[1]).item() if totals[1] else float("nan")
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50)),
            "eval_token_accuracy": (totals[2] / totals[1]).item() if totals[1] else float("nan"),
            "eval_tokens": int(totals[1])}
