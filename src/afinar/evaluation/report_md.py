"""The Markdown summary of a report: printed after `afinar eval` / `afinar train`, saved as
report.md."""

from __future__ import annotations

from afinar.evaluation.formatting import fmt_delta, fmt_value, is_better, label
from afinar.evaluation.preference import preference_markdown


def metrics_table(report: dict, single: str = "value") -> list[str]:
    """The metrics as a Markdown table (base, tuned, change when there is a baseline; else one
    column headed `single`), then the per-example changes: report.md's and the model card's."""
    has_base = report.get("baseline") is not None
    if has_base:
        lines = ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    else:
        lines = [f"| metric | {single} |", "|---|---:|"]
    for m in report.get("metrics", []):
        if has_base:
            mark = {True: " ✓", False: " ✗", None: ""}[is_better(m)]
            lines.append(f"| {label(m['name'])} | {fmt_value(m['name'], m['baseline'])} | "
                         f"{fmt_value(m['name'], m['model'])} | {fmt_delta(m)}{mark} |")
        else:
            lines.append(f"| {label(m['name'])} | {fmt_value(m['name'], m['model'])} |")
    changes = report.get("changes") or {}
    if changes:
        lines += ["", f"Per example: {changes['improved']} improved, {changes['worse']} worse, "
                  f"{changes['same']} identical, {changes['reworded']} reworded."]
    return lines


def render_markdown(report: dict) -> str:
    has_base = report["baseline"] is not None
    lines = [f"# Evaluation of {report['model']['spec']}", ""]
    lines.append(f"- data: {report['data']['source']} ({report['data']['examples']} examples)")
    if has_base:
        lines.append(f"- compared with: {report['baseline']['spec']}")
    lines.append("")
    lines += metrics_table(report)
    lines += preference_markdown(report.get("preference") or {})
    reg = report.get("regressions")
    if reg:
        s = reg["summary"]
        lines += ["", f"What did it break: {s['changed']} of {s['prompts']} general prompts "
                  f"answered differently ({s['changed_wording_only']} only in wording); their "
                  f"checks pass {fmt_value('check:', s['model_checks_pass_rate'])} (base "
                  f"{fmt_value('check:', s['baseline_checks_pass_rate'])}); taught format found "
                  f"in {s['model_leaks']} (base {s['baseline_leaks']})."]
        for name, found in (reg.get("cross_system") or {}).items():
            if isinstance(found, dict) and found["prompts"]:
                what = name.replace("_", " ")
                lines.append(f"Across system prompts ({what}): taught format in "
                             f"{found['model_leaks']} of {found['prompts']} (base "
                             f"{found['baseline_leaks']}).")
    training = report.get("training")
    if training:
        lines += ["", f"Training: {training['diagnosis']['message']}."]
    if report.get("tuning"):
        lines += ["", "## Hyperparameter search", "", tuning_intro(report["tuning"]), ""]
        head, rows = tuning_table(report["tuning"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines += ["| " + " | ".join(cells) + " |" for cells, _ in rows]
    if report["warnings"]:
        lines += [""] + [f"- **warning:** {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def tuning_intro(tuning: dict) -> str:
    """What the search (RUN/tune/trials.json, afinar.tune) did, in a sentence or two."""
    split, best = tuning["inner_split"], tuning["best"]
    searched = [f"{name.replace('_', ' ')} {_tuned(name, s['low'])}–{_tuned(name, s['high'])} "
                f"(auto {_tuned(name, s['auto'])})" for name, s in tuning["search"].items()
                if "low" in s]
    fixed = [f"{name.replace('_', ' ')} {_tuned(name, s['fixed'])}"
             for name, s in tuning["search"].items() if "fixed" in s]
    return (f"{len(tuning['trials'])} short runs searched {', '.join(searched)}"
            + (f" with {', '.join(fixed)} as set" if fixed else "")
            + f", trained on {split['train']} examples of the training part and scored on the "
            f"other {split['held_out']} (not on this report's held-out examples) by "
            f"{tuning['objective_text']}. Chosen: trial {best['trial']}, learning rate "
            f"{_tuned('learning_rate', best['learning_rate'])}, {best['epochs']} epochs "
            f"({tuning['seconds']:.0f} s in all).")


def tuning_table(tuning: dict) -> tuple[list[str], list[tuple[list[str], bool]]]:
    """Header and rows (cells, is the winner) of the trials table, for both reports."""
    by_checks = tuning["objective"] == "check_pass_rate"
    head = ["trial", "learning rate", "epochs", "steps", "held-out loss"]
    head += ["check pass rate"] * by_checks + ["score", "seconds", "chosen"]
    rows = []
    for t in tuning["trials"]:
        winner = t["trial"] == tuning["best"]["trial"]
        cells = [f"{t['trial']}" + (" (auto)" if t.get("auto") else ""),
                 _tuned("learning_rate", t["learning_rate"]), str(t["epochs"]),
                 "–" if t.get("steps") is None else str(t["steps"]),
                 _tuned("eval_loss", t.get("eval_loss"))]
        if by_checks:
            cells.append(_tuned("check_pass_rate", t.get("check_pass_rate")))
        cells += [_tuned("check_pass_rate" if by_checks else "eval_loss", t.get("score")),
                  f"{t['seconds']:.0f}" + (f" (as {t['same_as']})" if t.get("same_as") else ""),
                  "✓" if winner else ""]
        rows.append((cells, winner))
    return head, rows


def _tuned(name: str, value) -> str:
    if value is None:
        return "–"
    if name == "learning_rate":
        return f"{value:.2g}"
    if name == "check_pass_rate":
        return f"{value:.0%}"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
