"""The overfitting diagnosis of a run, read from its metrics.jsonl.

    diagnose(read_metrics(run / "metrics.jsonl"))
    # {"verdict": "overfitting", "best_step": 36, "rose_after_best": True, ...}

Verdicts: no_evaluations, improving (held-out loss still falling at the end: more training may
help), plateau (best at the end or within noise of it), overfitting (held-out loss rose after its
best by more than `tolerance`; the best checkpoint is what the run kept), not_learning (never
beat the base model's loss).
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Every parseable line; a line cut short by a killed process is skipped, not fatal."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series for the chart: train loss per step, held-out loss per evaluation."""
    train = [(r["step"], r["train_loss"]) for r in records
             if r.get("type") == "train" and r.get("train_loss") is not None]
    held = [(r["step"], r["eval_loss"]) for r in records
            if r.get("type") == "eval" and r.get("eval_loss") is not None]
    return {"train_loss": train, "eval_loss": held}


def diagnose(records: list[dict], tolerance: float = 0.02) -> dict:
    """`tolerance`: a relative rise of held-out loss smaller than this is noise, not a trend."""
    held = curves(records)["eval_loss"]
    train = curves(records)["train_loss"]
    if not held:
        return {"verdict": "no_evaluations", "message": "no held-out evaluations were logged, so "
                "overfitting cannot be judged (train with held-out data)"}
    best_step, best = min(held, key=lambda p: (p[1], p[0]))
    first_step, first = held[0]
    last_step, last = held[-1]
    after = [(s, v) for s, v in held if s > best_step]
    rise = (last - best) / best if best else 0.0
    out = {"best_step": best_step, "best_eval_loss": best, "first_eval_loss": first,
           "first_eval_step": first_step, "final_eval_loss": last, "final_step": last_step,
           "evaluations": len(held), "evaluations_after_best": len(after),
           "rose_after_best": rise > tolerance, "relative_rise": rise,
           "final_train_loss": train[-1][1] if train else None}
    if out["final_train_loss"] is not None:
        out["generalisation_gap"] = last - out["final_train_loss"]
    if len(held) > 1 and best >= first and best_step == first_step:
        verdict, message = "not_learning", (
            f"held-out loss never went below its first value ({first:.4f} at step "
            f"{first_step}): the model did not learn anything that generalises; check the "
            "learning rate and the data")
    elif rise > tolerance:
        verdict, message = "overfitting", (
            f"held-out loss was best at step {best_step} ({best:.4f}) and rose {rise:.1%} over "
            f"the {len(after)} evaluation(s) after it, to {last:.4f} at step {last_step}: the "
            "model started memorising the training set. The run kept the best checkpoint; "
            "fewer epochs, a lower learning rate or more data would help")
    elif best_step == last_step and len(held) > 2 and held[-2][1] - last > tolerance * last:
        verdict, message = "improving", (
            f"held-out loss was still falling at the last evaluation ({held[-2][1]:.4f} → "
            f"{last:.4f} at step {last_step}): more training may help")
    else:
        verdict, message = "plateau", (
            f"held-out loss settled: best {best:.4f} at step {best_step}, final {last:.4f} at "
            f"step {last_step} (within {tolerance:.0%}); no sign of overfitting")
    out.update(verdict=verdict, message=message)
    return out
