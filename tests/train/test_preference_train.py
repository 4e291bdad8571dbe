"""DPO and ORPO runs on a tiny random Llama: step 0, learning, resume, SFT-then-DPO, full."""

from __future__ import annotations

import json
import math

import pytest
import torch

from afinar import rundir
from afinar.config import TrainConfig
from afinar.data.pairs import encode_pairs
from afinar.data.validate import load_examples
from afinar.infer.generate import load
from afinar.models.registry import resolve_model
from afinar.pipeline import fine_tune
from afinar.losses.preference import AnswerLogProbs
from afinar.train.reference import REFERENCE_FILE
from conftest import write_jsonl

# The rule the preferred answers follow (they give the priority); the rejected ones never do.
CHECKS = r"""checks:
  - name: formato
    regex: '(?s).*\balta\b.*'
"""


def _pairs(folder, n=40):
    return write_jsonl(folder / "pairs.jsonl", [
        {"prompt": f"pedido {i} llegó roto",
         "chosen": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}",
         "rejected": f"lo siento mucho por el pedido {i}"} for i in range(n)])


def _config(data, model, out, **kw):
    base = dict(data=str(data), model=str(model), output=str(out), objective="dpo",
                learning_rate=1e-2, batch_size=4, max_steps=30, eval_steps=10, seed=0,
                precision="fp32", evaluate=False)
    return TrainConfig(**{**base, **kw})


def _records(run, kind):
    return [r for r in map(json.loads, (run / rundir.METRICS_FILE).read_text().splitlines())
            if r["type"] == kind]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("dpo")
    (folder / "checks.yaml").write_text(CHECKS, encoding="utf-8")
    config = _config(_pairs(folder), tiny_model_dir, folder / "run", evaluate=True,
                     checks=str(folder / "checks.yaml"))
    return fine_tune(config), folder


def test_dpo_starts_at_ln2_with_no_wins_and_learns(dpo_run):
    result, _ = dpo_run
    run = result.run_dir
    first_eval, *_, last_eval = _records(run, "eval")
    first_step = _records(run, "train")[0]
    # Step 0: the policy is the reference (LoRA's B is zero), so every pair is a tie; the loss
    # is the DPO term plus the default SFT term on the chosen answers.
    for record, prefix in ((first_eval, "eval"), (first_step, "train")):
        assert record[f"{prefix}_preference_loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert record[f"{prefix}_loss"] == pytest.approx(math.log(2) + record[f"{prefix}_nll"],
                                                         rel=1e-5)
        assert record[f"{prefix}_preference_accuracy"] == 0
        assert record[f"{prefix}_preference_ties"] == 1
    assert last_eval["eval_preference_accuracy"] > 0.9
    assert last_eval["eval_preference_loss"] < 0.4 and last_eval["eval_nll"] < first_eval["eval_nll"]
    assert last_eval["eval_reward_margin"] > 0.5
    assert last_eval["eval_chosen_logp_change"] > 0 > last_eval["eval_rejected_logp_change"]
    stored = json.loads((run / REFERENCE_FILE).read_text())
    assert len(stored["train"]) == 32 and len(stored["held"]) == 8
    assert "adapter off" in stored["model"]


def test_the_report_shows_accuracy_up_and_the_rule_more_often(dpo_run):
    result, _ = dpo_run
    report = json.loads((result.run_dir / "report.json").read_text())
    metrics = {m["name"]: m for m in report["metrics"]}
    assert metrics["preference_accuracy"]["model"] > metrics["preference_accuracy"]["baseline"]
    assert metrics["reward_accuracy"]["model"] > 0.9
    assert metrics["check:formato"]["model"] > metrics["check:formato"]["baseline"]
    pref = report["preference"]
    assert pref["pairs"] == 8 and pref["model"]["answer_words"] > 0
    assert "## Preference pairs" in (result.run_dir / "report.md").read_text()
    assert "id=preference" in (result.run_dir / "report.html").read_text()


def test_orpo_learns_without_a_reference(tmp_path, tiny_model_dir):
    result = fine_tune(_config(_pairs(tmp_path), tiny_model_dir, tmp_path / "run",
                           objective="orpo", max_steps=20))
    evals = _records(result.run_dir, "eval")
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["eval_preference_accuracy"] > evals[0]["eval_preference_accuracy"]
    assert not (result.run_dir / REFERENCE_FILE).exists()
    assert (result.run_dir / rundir.ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_a_resumed_dpo_run_reads_its_reference_instead_of_recomputing(tmp_path, tiny_model_dir):
    config = _config(_pairs(tmp_path), tiny_model_dir, tmp_path / "run", save_steps=2,
                     max_steps=8, eval_steps=4)
    messages = []

    def stop_at_step_5(event):
        if event["type"] == "log":
            messages.append(event["message"])
        if event["type"] == "step" and event["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fine_tune(config, on_event=stop_at_step_5)
    stored = (tmp_path / "run" / REFERENCE_FILE).read_text()
    assert any("reference log-probs" in m for m in messages)
    messages.clear()
    result = fine_tune(config, on_event=lambda e: e["type"] == "log" and messages.append(
        e["message"]), resume=True)
    assert result.summary["steps"] == 8
    assert not any("reference log-probs" in m for m in messages)
    assert (tmp_path / "run" / REFERENCE_FILE).read_text() == stored


def _pair_logps(spec, data):
    loaded = load(str(spec), notify=lambda m: None)
    pairs = encode_pairs(load_examples(data).examples, loaded.encoder)
    from afinar.data.batching import collate

    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs],
                    loaded.tokenizer.pad_token_id)
    with torch.no_grad():
        sums, _ = AnswerLogProbs(loaded.model)(**batch)
    return sums


def test_dpo_from_an_sft_run_uses_the_sft_model_as_reference(tmp_path, tiny_model_dir,
                                                           small_chat_file):
    sft = fine_tune(TrainConfig(data=str(small_chat_file), model=str(tiny_model_dir),
                            output=str(tmp_path / "sft"), learning_rate=1e-2, max_steps=15,
                            seed=0, precision="fp32", evaluate=False, held_out_fraction=0.0))
    data = _pairs(tmp_path, n=12)
    dpo = fine_tune(_config(data, sft.run_dir, tmp_path / "dpo", max_steps=6, eval_steps=3,
                        held_out_fraction=0.0))
    stored = json.loads((dpo.run_dir / REFERENCE_FILE).read_text())["train"]
    sft_logps = _pair_logps(sft.run_dir, data)
    base_logps = _pair_logps(tiny_model_dir, data)
    # Every stored reference value is the SFT model's, not the raw base's (nothing is held
    # out, so the training pairs are the file's, in order).
    assert torch.allclose(torch.tensor(stored), torch.stack([sft_logps[:12], sft_logps[12:]], 1),
                          atol=1e-3)
    assert not torch.allclose(torch.tensor(stored),
                              torch.stack([base_logps[:12], base_logps[12:]], 1), atol=1e-1)
    resolved = resolve_model(str(dpo.run_dir), notify=lambda m: None)
    assert resolved.merged_adapters == (sft.run_dir.resolve() / rundir.ADAPTER_DIR,)
    # The DPO run's model is base + SFT + DPO: its log-probs moved from the SFT model's.
    assert not torch.allclose(_pair_logps(dpo.run_dir, data), sft_logps, atol=1e-3)


def test_full_fine_tuning_dpo_trains_every_weight(tmp_path, tiny_model_dir):
    result = fine_tune(_config(_pairs(tmp_path, n=16), tiny_model_dir, tmp_path / "run",
                           method="full", learning_rate=1e-3, max_steps=6, eval_steps=3,
                           dpo={"sft_weight": 0.0}))  # the DPO paper's loss alone
    evals = _records(result.run_dir, "eval")
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[0]["eval_nll"] > 0 and evals[0]["eval_loss"] == evals[0]["eval_preference_loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert "adapter" not in json.loads((result.run_dir / REFERENCE_FILE).read_text())["model"]
    assert (result.run_dir / rundir.FULL_MODEL_DIR).is_dir()
