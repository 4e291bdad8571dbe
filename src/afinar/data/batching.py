"""Length-aware batches and collation.

Batches group examples of similar length (less padding), their order is shuffled per epoch from
(seed, epoch) alone, so a resumed run replays exactly the same order, and the batch with the most
tokens always comes first: an out-of-memory shows up at step 1, not at step 120.
"""

from __future__ import annotations

import random

import torch

from afinar.data.tokenize import IGNORE, Tokenized

_MEGABATCH = 16  # sort within windows of 16 batches: little padding, still shuffled


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index lists, one per micro-batch, for one epoch."""
    order = list(range(len(lengths)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    window = batch_size * _MEGABATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    if batches:
        cost = [max(lengths[i] for i in b) * len(b) for b in batches]
        first = cost.index(max(cost))
        batches.insert(0, batches.pop(first))
    return batches


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors. Padding is masked by position, never by token id, so an EOS whose
    id equals the pad id still carries loss."""
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(item.weight != 1.0 for item in items):
        batch["weights"] = _token_weights(items, labels)
    return batch


def _token_weights(items: list[Tokenized], labels: torch.Tensor) -> torch.Tensor:
    """Per position, the weight of the label there: 1 for the first `full_weight_tokens`
    supervised tokens of an example, its `weight` after them."""
    weights = torch.ones(labels.shape, dtype=torch.float32)
    for row, item in enumerate(items):
        supervised = (labels[row] != IGNORE).nonzero().flatten()
        weights[row, supervised[item.full_weight_tokens:]] = item.weight
    return weights


def target_weight(batch: dict[str, torch.Tensor]) -> float:
    """The batch's supervised tokens, each counted with its weight: what a weighted loss sum
    is normalised by."""
    keep = (batch["labels"][:, 1:] != IGNORE).float()
    if "weights" in batch:
        keep = keep * batch["weights"][:, 1:]
    return float(keep.sum())
