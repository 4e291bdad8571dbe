"""What a training step optimises: the small piece the one training loop calls.

    objective = make_objective(config, model)      # Supervised, or Preference (dpo / orpo)
    batch = objective.collate(items, pad_id)
    target, plain = objective.denominators(batch)  # summed over a step's micro-batches/ranks
    loss, stats = objective.loss(module, batch, target, plain)
    record = objective.record(summed_stats, target, plain)

`loss` is already divided by the step's denominators, so a step's micro-batch losses add up to
its loss whatever the accumulation; `stats` are plain sums the loop adds across micro-batches
and processes, from which `record` makes the logged metrics.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from afinar.data.batching import collate, target_weight
from afinar.data.pairs import PairTokenized
from afinar.data.tokenize import IGNORE
from afinar.losses.held_out import evaluate_loss
from afinar.losses.supervised import SupervisedLoss
from afinar.losses.preference import (TIE_TOLERANCE, AnswerLogProbs, dpo_losses,
                                     orpo_log_odds)


class Supervised:
    """Token-level cross-entropy on the answers, normalised per (weighted) target token."""

    name = "sft"

    def __init__(self, model):
        self.module = SupervisedLoss(model)

    @staticmethod
    def length(item) -> int:
        return len(item.input_ids)

    @staticmethod
    def collate(items, pad_id: int) -> dict:
        return collate(items, pad_id)

    @staticmethod
    def denominators(batch: dict) -> tuple[float, float]:
        return target_weight(batch), float((batch["labels"][:, 1:] != IGNORE).sum())

    @staticmethod
    def loss(module, batch: dict, target: float, plain: float):
        loss_sum, _, correct = module(**batch)
        stats = torch.tensor([loss_sum.item(), correct.item()], dtype=torch.float64)
        return loss_sum / max(1.0, target), stats

    @staticmethod
    def record(sums: torch.Tensor, target: float, plain: float) -> dict:
        return {"train_loss": (sums[0] / max(1, target)).item(),
                "train_token_accuracy": (sums[1] / max(1, plain)).item()}

    def evaluate(self, module, items, batch_size, pad_id, accelerator) -> dict:
        return evaluate_loss(module, items, batch_size, pad_id, accelerator)


# Per-pair sums a preference step keeps (the loss, already normalised, comes first).
_STATS = ("loss", "preference_loss", "nll", "wins", "ties", "margin", "chosen", "rejected",
          "chosen_tokens", "rejected_tokens", "pairs")


class Preference:
    """DPO (against reference log-probs stored on each pair) or ORPO (no reference)."""

    def __init__(self, model, config):
        self.name = config.objective
        self.module = AnswerLogProbs(model)
        self.dpo, self.orpo = config.dpo, config.orpo

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    @staticmethod
    def length(pair: PairTokenized) -> int:
        return pair.length

    def collate(self, pairs: list[PairTokenized], pad_id: int) -> dict:
        batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
        if self.needs_reference:
            missing = [p.index for p in pairs if p.reference is None]
            if missing:
                raise RuntimeError(f"pairs {missing[:5]} have no reference log-probs")
            batch["reference"] = torch.tensor([p.reference for p in pairs], dtype=torch.float32)
        return batch

    @staticmethod
    def denominators(batch: dict) -> tuple[float, float]:
        """(pairs, tokens of the chosen answers): DPO is a mean over pairs; the SFT term of
        ORPO (and DPO's sft_weight) a mean over the chosen answers' tokens."""
        pairs = batch["input_ids"].shape[0] // 2
        return float(pairs), float((batch["labels"][:pairs, 1:] != IGNORE).sum())

    def loss(self, module, batch: dict, target: float, plain: float):
        sums, counts = module(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"], labels=batch["labels"])
        n = sums.shape[0] // 2
        chosen, rejected = sums[:n], sums[n:]
        chosen_tokens, rejected_tokens = counts[:n].float(), counts[n:].float()
        nll = -chosen.sum() / max(1.0, plain)
        if self.name == "dpo":
            ref = batch["reference"].to(sums.device)
            per_pair = dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], self.dpo.beta,
                                  self.dpo.loss, self.dpo.label_smoothing, chosen_tokens,
                                  rejected_tokens)
            preference = per_pair.sum() / max(1.0, target)
            loss = preference + self.dpo.sft_weight * nll if self.dpo.sft_weight else preference
            chosen_change = (chosen - ref[:, 0]).detach()
            rejected_change = (rejected - ref[:, 1]).detach()
            margin = self.dpo.beta * (chosen_change - rejected_change)
            gap = chosen_change - rejected_change
        else:  # orpo
            log_odds = orpo_log_odds(chosen / chosen_tokens.clamp(min=1),
                                     rejected / rejected_tokens.clamp(min=1))
            preference = -self.orpo.lambda_ * torch.nn.functional.logsigmoid(
                log_odds).sum() / max(1.0, target)
            loss = nll + preference
            # ORPO has no reference: its "change" columns are the mean per-token log-probs.
            chosen_change = (chosen / chosen_tokens.clamp(min=1)).detach()
            rejected_change = (rejected / rejected_tokens.clamp(min=1)).detach()
            margin = self.orpo.lambda_ * (chosen_change - rejected_change)
            gap = (chosen_change - rejected_change)
        stats = torch.stack([
            loss.detach().double(), preference.detach().double(), nll.detach().double(),
            (gap > TIE_TOLERANCE).sum().double(),
            (gap.abs() <= TIE_TOLERANCE).sum().double(), margin.sum().double(),
            chosen_change.sum().double(), rejected_change.sum().double(),
            chosen_tokens.sum().double(), rejected_tokens.sum().double(),
            torch.tensor(float(n), dtype=torch.float64, device=sums.device)]).cpu()
        return loss, stats

    def record(self, sums: torch.Tensor, target: float, plain: float, prefix: str = "train"
               ) -> dict:
        s = dict(zip(_STATS, sums.tolist()))
        pairs = max(1.0, s["pairs"])
        what = "logp_change" if self.name == "dpo" else "mean_logp"
        # loss = preference_loss (+ the weighted SFT term: ORPO's, DPO's sft_weight); nll is
        # the chosen answers' mean token NLL.
        return {f"{prefix}_loss": s["loss"], f"{prefix}_preference_loss": s["preference_loss"],
                f"{prefix}_nll": s["nll"],
                f"{prefix}_preference_accuracy": s["wins"] / pairs,
                f"{prefix}_preference_ties": s["ties"] / pairs,
                f"{prefix}_reward_margin": s["margin"] / pairs,
                f"{prefix}_chosen_{what}": s["chosen"] / pairs,
                f"{prefix}_rejected_{what}": s["rejected"] / pairs,
                f"{prefix}_chosen_tokens": s["chosen_tokens"] / pairs,
                f"{prefix}_rejected_tokens": s["rejected_tokens"] / pairs}

    @torch.no_grad()
    def evaluate(self, module, pairs, batch_size, pad_id, accelerator) -> dict:
        """The same loss and metrics on held-out pairs (each process a share, then summed)."""
        was_training = module.training
        module.eval()
        rank, world = accelerator.process_index, accelerator.num_processes
        mine = pairs[rank::world]
        batches = [self.collate(mine[i:i + batch_size], pad_id)
                   for i in range(0, len(mine), batch_size)]
        totals = torch.tensor([sum(self.denominators(b)[k] for b in batches) for k in (0, 1)],
                              dtype=torch.float64)
        if world > 1:
            totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
        sums = torch.zeros(len(_STATS), dtype=torch.float64)
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                sums += self.loss(module, batch, totals[0].item(), totals[1].item())[1]
        if world > 1:
            sums = accelerator.reduce(sums.to(accelerator.device), "sum").cpu()
        module.train(was_training)
        out = self.record(sums, totals[0].item(), totals[1].item(), prefix="eval")
        out["eval_pairs"] = int(totals[0])
        return out


def make_objective(config, model):
    return Supervised(model) if config.objective == "sft" else Preference(model, config)


@torch.no_grad()
def reference_log_probs(module: AnswerLogProbs, pairs: list[PairTokenized], batch_size: int,
                        pad_id: int, device, autocast=nullcontext, adapter_off=nullcontext,
                        on_progress=None) -> list[tuple[float, float]]:
    """Each pair's summed answer log-probs (chosen, rejected) under the reference model: the
    model as it is now, with `adapter_off` (peft's disable_adapter) when it carries a LoRA
    adapter. Run once before training; the values are stored with the run."""
    was_training = module.training
    module.eval()
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)
    out: list[tuple[float, float] | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        chosen = [pairs[i].chosen for i in group]
        batch = collate(chosen + [pairs[i].rejected for i in group], pad_id)
        with autocast(), adapter_off():
            sums, _ = module(**{k: v.to(device) for k, v in batch.items()})
        sums = sums.float().cpu().tolist()
        for j, i in enumerate(group):
            out[i] = (sums[j], sums[len(group) + j])
        if on_progress:
            on_progress(min(start + batch_size, len(order)), len(order))
    module.train(was_training)
    if any(not math.isfinite(v) for pair in out for v in pair):
        raise RuntimeError("the reference model gives a non-finite log-probability")
    return out
