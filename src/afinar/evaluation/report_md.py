"""The Markdown summary of a report: printed after `afinar eval` / `afinar train`, saved as
report.md."""

from __future__ import annotations

from afinar.evaluation.formatting import fmt_delta, fmt_value, is_better, label


def render_markdown(report: dict) -> str:
    has_base = report["baseline"] is not None
    lines = [f"# Evaluation of {report['model']['spec']}", ""]
    lines.append(f"- data: {report['data']['source']} ({report['data']['examples']} examples)")
    if has_base:
        lines.append(f"- compared with: {report['baseline']['spec']}")
    lines.append("")
    if has_base:
        lines += ["| metric | base | tuned | change |", "|---|---:|---:|---:|"]
    else:
        lines += ["| metric | value |", "|---|---:|"]
    for m in report["metrics"]:
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
    reg = report.get("regressions")
    if reg:
        s = reg["summary"]
        lines += ["", f"What did it break: {s['changed']} of {s['prompts']} general prompts "
                  f"answered differently ({s['changed_wording_only']} only in wording); their "
                  f"checks pass {fmt_value('check:', s['model_checks_pass_rate'])} (base "
                  f"{fmt_value('check:', s['baseline_checks_pass_rate'])}); taught format found "
                  f"in {s['model_leaks']} (base {s['baseline_leaks']})."]
    training = report.get("training")
    if training:
        lines += ["", f"Training: {training['diagnosis']['message']}."]
    if report["warnings"]:
        lines += [""] + [f"- **warning:** {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"
