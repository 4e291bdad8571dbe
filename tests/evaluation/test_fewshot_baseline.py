"""`afinar eval RUN --baseline fewshot:K` on the tiny model: the base model answers each
held-out prompt after exactly K of the run's training examples (never a held-out one) and the
training system prompt; the report says which, and scores it beside the tuned model."""

from __future__ import annotations

import json

import pytest

from afinar.config import load_train_config
from afinar.data.prepare import split_for
from afinar.data.validate import load_examples
from afinar.errors import AfinarError
from afinar.evaluation.evaluator import evaluate


def test_fewshot_uses_exactly_k_training_examples_and_never_a_held_out_one(evaluated_run):
    result, _ = evaluated_run
    run = result.run_dir
    report = evaluate(str(run), baseline="fewshot:3", probes=False, notify=lambda m: None).data
    config = load_train_config(run / "config.yaml", anchor_paths=False)
    train, held, _ = split_for(config, load_examples(config.data))
    train_where = {ex.where for ex in train}
    held_where = {ex.where for ex in held}

    info = report["baseline"]["fewshot"]
    assert info["k"] == 3 and len(set(info["shots"])) == 3
    assert set(info["shots"]) <= train_where and not set(info["shots"]) & held_where
    prompt = info["example_prompt"]
    # 3 shots of (question, answer), then the held-out question: 7 turns, the last a user's.
    assert [m["role"] for m in prompt] == ["user", "assistant"] * 3 + ["user"]
    assert prompt[-1]["content"] == report["examples"][0]["prompt"][-1]["content"]
    shot_questions = {m["content"] for m in prompt[:-1] if m["role"] == "user"}
    held_questions = {ex.messages[0].content for ex in held}
    assert not shot_questions & held_questions
    # Scored on the same held-out prompts, beside the tuned model, in a report of its own.
    assert report["baseline"]["spec"].endswith("prompted with 3 training examples (fewshot:3)")
    assert report["data"]["examples"] == len(held)
    assert all(row["baseline"]["answer"] is not None for row in report["examples"])
    metrics = {m["name"]: m for m in report["metrics"]}
    assert metrics["eval_loss"]["baseline"] is not None  # the shots must not cut the answers off
    assert metrics["rouge_l"]["baseline"] is not None
    assert (run / "eval-fewshot3" / "report.json").is_file()
    assert json.loads((run / "report.json").read_text())["baseline"]["spec"] != \
        report["baseline"]["spec"]  # the run's own report is left as it was


def test_fewshot_needs_a_run_and_a_sane_k(evaluated_run, tiny_model_dir, tmp_path):
    result, folder = evaluated_run
    with pytest.raises(AfinarError, match="K must be between 1 and 32"):
        evaluate(str(result.run_dir), baseline="fewshot:0", probes=False)
    with pytest.raises(AfinarError, match="needs a run"):
        evaluate(str(tiny_model_dir), data=str(folder / "small.jsonl"), baseline="fewshot",
                 probes=False)
