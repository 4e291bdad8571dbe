"""Events (afinar/events.py): typed fields for new listeners, and the flat dict the older ones
read, with a Step's metrics and an End's summary at the top level as in metrics.jsonl."""

from __future__ import annotations

from afinar import events as ev


def test_a_step_reads_by_field_and_as_its_flat_record():
    step = ev.Step(3, 0.5, {"train_loss": 1.25, "learning_rate": 1e-3}, total_steps=10,
                   eta_s=7.0)
    assert step.type == "step" and step.metrics["train_loss"] == 1.25
    assert step.to_dict() == {"type": "step", "step": 3, "epoch": 0.5, "train_loss": 1.25,
                              "learning_rate": 1e-3, "total_steps": 10, "eta_s": 7.0}
    assert step["train_loss"] == 1.25 and step["type"] == "step"
    assert "learning_rate" in step and "eval_loss" not in step
    assert step.get("eval_loss", "none") == "none"


def test_an_end_spreads_its_summary_and_a_trial_nests_its_event():
    end = ev.End("runs/x", {"steps": 4, "best_eval_loss": None})
    assert end.to_dict() == {"type": "end", "run_dir": "runs/x", "steps": 4,
                             "best_eval_loss": None}
    trial = ev.TuneTrial(1, 4, ev.Log("info", "hola"))
    assert trial.to_dict() == {"type": "tune_trial", "trial": 1, "trials": 4, "event": {
        "type": "log", "level": "info", "message": "hola"}}
    assert isinstance(trial.event, ev.Log) and trial["event"]["message"] == "hola"
