"""Token-normalised loss, gradient accumulation, and the batch plan."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from afinar.data.batching import plan_batches
from afinar.data.tokenize import IGNORE
from afinar.losses.supervised import SupervisedLoss, supervised_ce
from conftest import build_tiny_model


def _batch(lengths, supervised, vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for row, (n, k) in enumerate(zip(lengths, supervised)):
        mask[row, :n] = 1
        labels[row, n - k:n] = ids[row, n - k:n]
    return ids, mask, labels


def test_supervised_ce_matches_full_logits_cross_entropy(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer).eval()
    ids, mask, labels = _batch([12, 7, 20], [3, 7, 5], vocab=len(tiny_tokenizer))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                                   reduction="sum")
        total, count, correct = SupervisedLoss(model)(ids, mask, labels)
    assert count.item() == int((labels[:, 1:] != IGNORE).sum())
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-4)
    assert 0 <= correct.item() <= count.item()


def test_chunked_head_matches_unchunked(monkeypatch):
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(2, 40, 8)
    labels = torch.randint(0, 30, (2, 40))
    labels[:, :5] = IGNORE
    full = supervised_ce(hidden, labels, head)
    monkeypatch.setattr("afinar.losses.supervised.CHUNK_ROWS", 7)
    chunked = supervised_ce(hidden, labels, head)
    torch.testing.assert_close(full[0], chunked[0])
    assert full[1] == chunked[1] and full[2] == chunked[2]


def _reference_ce(hidden, labels, head, softcap=None, weights=None):
    """Plain autograd over the full logits: what the fused head must equal."""
    logits = head(hidden[:, :-1]).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE, reduction="none")
    if weights is not None:
        losses = losses * weights[:, 1:].reshape(-1)
    return losses.sum()


def test_fused_head_gradients_match_autograd(monkeypatch):
    """The fused head computes its gradients in the forward pass: they must be the ones
    autograd gets from the full logits (hidden states, head weight and bias, softcap, token
    weights, and the incoming gradient's scale), over several chunks."""
    monkeypatch.setattr("afinar.losses.supervised.CHUNK_ROWS", 5)
    torch.manual_seed(0)
    for softcap, weighted in ((None, False), (30.0, True)):
        head = torch.nn.Linear(8, 30, bias=True)
        hidden = torch.randn(2, 12, 8, requires_grad=True)
        labels = torch.randint(0, 30, (2, 12))
        labels[:, :4] = IGNORE
        weights = torch.rand(2, 12) if weighted else None
        total, _, _ = supervised_ce(hidden, labels, head, softcap, weights)
        (total * 0.37).backward()
        fused = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
        for t in (hidden, head.weight, head.bias):
            t.grad = None
        expected = _reference_ce(hidden, labels, head, softcap, weights)
        (expected * 0.37).backward()
        torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(fused, (hidden.grad, head.weight.grad, head.bias.grad)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_accumulation_normalises_by_all_target_tokens(tiny_tokenizer):
    """Two micro-batches with very different token counts give the same gradient as one batch
    (loss = sum over all target tokens / their total), and not the per-micro-batch-mean one."""
    ids, mask, labels = _batch([30, 30, 10, 10], [25, 20, 2, 1], vocab=len(tiny_tokenizer))
    model = build_tiny_model(tiny_tokenizer)
    loss_model = SupervisedLoss(model)

    total, count, _ = loss_model(ids, mask, labels)
    (total / count).backward()
    whole = _grads(model).clone()
    model.zero_grad()

    parts = [(ids[:2], mask[:2], labels[:2]), (ids[2:, :10], mask[2:, :10], labels[2:, :10])]
    n_all = sum(int((lab[:, 1:] != IGNORE).sum()) for _, _, lab in parts)
    for part in parts:
        loss_sum, _, _ = loss_model(*part)
        (loss_sum / n_all).backward()
    torch.testing.assert_close(_grads(model), whole, rtol=1e-4, atol=1e-6)
    model.zero_grad()

    for part in parts:  # the common bug: mean per micro-batch, averaged
        loss_sum, n, _ = loss_model(*part)
        (loss_sum / n / len(parts)).backward()
    assert not torch.allclose(_grads(model), whole, rtol=1e-3, atol=1e-6)


def test_plan_batches_longest_first_deterministic_and_complete():
    lengths = [5, 50, 7, 300, 12, 8, 90, 33, 64, 2, 17, 21, 40]
    plan = plan_batches(lengths, 3, seed=1, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert 3 in plan[0]  # the longest example's batch comes first
    assert plan == plan_batches(lengths, 3, seed=1, epoch=0)
    assert plan != plan_batches(lengths, 3, seed=1, epoch=1)  # reshuffled each epoch
    cost = [max(lengths[i] for i in b) * len(b) for b in plan]
    assert cost[0] == max(cost)
