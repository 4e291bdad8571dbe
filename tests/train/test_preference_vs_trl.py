"""afinar's DPO and ORPO numbers against TRL's own code on the same batch (TRL is installed with
the dev extra; nothing is mocked: TRL's DPOTrainer computes its loss on a real tiny model)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from afinar.data.tokenize import IGNORE
from afinar.losses.preference import AnswerLogProbs, dpo_losses, orpo_log_odds, orpo_odds_term
from conftest import build_tiny_model

ROWS = [{"prompt": [{"role": "user", "content": f"pedido {i} llegó roto"}],
         "chosen": [{"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta {i}"}],
         "rejected": [{"role": "assistant", "content": "lo siento mucho" + " mucho" * (i % 3)}]}
        for i in range(8)]


def _labels(batch):
    return batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    # Policy and reference differ, so the log-ratios (and the loss) are not trivially zero.
    return build_tiny_model(tiny_tokenizer, seed=0), build_tiny_model(tiny_tokenizer, seed=1)


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("ipo", 0.0),
                                                 ("robust", 0.2)])
def test_dpo_loss_and_log_probs_equal_trl(tmp_path, tiny_tokenizer, models, loss_type,
                                          smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, ref = models
    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[],
                     per_device_train_batch_size=4, beta=0.1, max_length=256,
                     loss_type=[loss_type], label_smoothing=smoothing)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args,
                         train_dataset=Dataset.from_list(ROWS), processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer._compute_loss(trainer.model, batch, False).item()
    trl = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    labels = _labels(batch)
    with torch.no_grad():
        mine, counts = AnswerLogProbs(policy)(batch["input_ids"], batch["attention_mask"], labels)
        theirs, _ = AnswerLogProbs(ref)(batch["input_ids"], batch["attention_mask"], labels)
    n = mine.shape[0] // 2
    losses = dpo_losses(mine[:n], mine[n:], theirs[:n], theirs[n:], 0.1, loss_type, smoothing,
                        counts[:n].float(), counts[n:].float())
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-4)
    assert mine[:n].mean().item() == pytest.approx(trl["logps/chosen"], abs=1e-4)
    assert mine[n:].mean().item() == pytest.approx(trl["logps/rejected"], abs=1e-4)
    margin = 0.1 * ((mine[:n] - theirs[:n]) - (mine[n:] - theirs[n:]))
    assert margin.mean().item() == pytest.approx(trl["rewards/margins"], abs=1e-4)


def test_orpo_log_probs_and_odds_term_equal_trl(tiny_tokenizer, models):
    from trl.experimental.orpo import ORPOTrainer

    policy, _ = models
    ids = [tiny_tokenizer.apply_chat_template(r["prompt"] + side, tokenize=False)
           for r in ROWS for side in (r["chosen"], r["rejected"])]
    prompt_len = [len(tiny_tokenizer(tiny_tokenizer.apply_chat_template(
        r["prompt"], tokenize=False, add_generation_prompt=True))["input_ids"]) for r in ROWS]
    encoded = [tiny_tokenizer(text)["input_ids"] for text in ids]
    width = max(map(len, encoded))
    input_ids = torch.full((len(encoded), width), tiny_tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), IGNORE)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, seq in enumerate(encoded):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        start = prompt_len[row // 2]
        labels[row, start:len(seq)] = torch.tensor(seq[start:])
    order = list(range(0, len(encoded), 2)) + list(range(1, len(encoded), 2))  # chosen first
    input_ids, labels, mask = input_ids[order], labels[order], mask[order]

    with torch.no_grad():
        logits = policy(input_ids=input_ids, attention_mask=mask).logits
        trl_avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        sums, counts = AnswerLogProbs(policy)(input_ids, mask, labels)
    avg = sums / counts
    assert torch.allclose(avg, trl_avg, atol=1e-4)
    n = len(ROWS)
    fake = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    trl_losses, *_rest, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, trl_avg[:n], trl_avg[n:])
    assert torch.allclose(0.1 * orpo_odds_term(avg[:n], avg[n:]), trl_losses, atol=1e-4)
    assert orpo_log_odds(avg[:n], avg[n:]).mean().item() == pytest.approx(trl_log_odds.item(),
                                                                          abs=1e-4)


def test_dpo_loss_is_ln2_when_policy_is_reference():
    same = torch.tensor([-12.5, -30.0])
    losses = dpo_losses(same, same - 3, same, same - 3, beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
