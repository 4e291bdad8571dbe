"""The overfitting diagnosis on synthetic metrics files."""

from __future__ import annotations

import json

from afinar.evaluation.diagnosis import curves, diagnose, read_metrics


def _write(path, evals, train=None):
    lines = [{"type": "train", "step": s, "train_loss": v} for s, v in (train or [])]
    lines += [{"type": "eval", "step": s, "eval_loss": v} for s, v in evals]
    lines.sort(key=lambda r: (r["step"], r["type"] == "eval"))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return read_metrics(path)


def test_overfitting_is_found_with_its_best_step(tmp_path):
    records = _write(tmp_path / "m.jsonl",
                     [(0, 3.5), (10, 2.6), (20, 2.4), (30, 2.5), (40, 2.7)],
                     train=[(s, 3.0 - s * 0.05) for s in range(1, 41)])
    d = diagnose(records)
    assert d["verdict"] == "overfitting"
    assert d["best_step"] == 20 and d["best_eval_loss"] == 2.4
    assert d["rose_after_best"] and d["evaluations_after_best"] == 2
    assert abs(d["relative_rise"] - (2.7 - 2.4) / 2.4) < 1e-9
    assert "step 20" in d["message"]


def test_still_improving_and_plateau_and_not_learning(tmp_path):
    assert diagnose(_write(tmp_path / "a", [(0, 3.0), (10, 2.5), (20, 2.0)]))["verdict"] \
        == "improving"
    flat = diagnose(_write(tmp_path / "b", [(0, 3.0), (10, 2.00), (20, 2.01), (30, 2.005)]))
    assert flat["verdict"] == "plateau" and not flat["rose_after_best"]
    assert diagnose(_write(tmp_path / "c", [(0, 2.0), (10, 2.3), (20, 2.2)]))["verdict"] \
        == "not_learning"
    assert diagnose([])["verdict"] == "no_evaluations"


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"type": "eval", "step": 0, "eval_loss": 3.0}\n{"type": "train", "st')
    records = read_metrics(path)
    assert curves(records) == {"train_loss": [], "eval_loss": [(0, 3.0)]}
