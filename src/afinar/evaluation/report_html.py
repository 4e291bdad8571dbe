"""report.html: one self-contained page (inline CSS and SVG, no scripts, nothing fetched).

Sections: the metrics table base vs tuned, the loss curves with the overfitting diagnosis, the
hyperparameter search when the run had one (`tune`), what the tuning broke (general prompts),
and every example with the tuned answer diffed against the base answer.
"""

from __future__ import annotations

import difflib
import html
import re
from pathlib import Path

from afinar.evaluation.formatting import fmt_delta, fmt_value, is_better, label
from afinar.evaluation.preference import preference_markdown
from afinar.evaluation.report_md import tuning_intro, tuning_table

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.meta{color:#5b6472;margin:0 0 16px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:16px 18px;
margin-bottom:18px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #edf0f4;vertical-align:top}
th{font-weight:600;color:#3b4350;background:#fafbfc}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.good{color:#12703a;font-weight:600}.bad{color:#b3261e;font-weight:600}
.warn{background:#fff6e0;border:1px solid #f0d48a;border-radius:6px;padding:8px 12px;margin:6px 0}
.tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.improved{background:#dcf5e5;color:#12703a}.worse{background:#fde2e0;color:#b3261e}
.same{background:#eceff3;color:#4a5260}.reworded{background:#e6eefc;color:#2452a8}
.n\\/a{background:#eceff3;color:#4a5260}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12.5px/1.4 ui-monospace,monospace}
ins{background:#d4f4dd;text-decoration:none}del{background:#fbdcd9}
.chart text{font-size:11px;fill:#5b6472}
.legend span{display:inline-block;margin-right:16px}
.fail{color:#b3261e}.pass{color:#12703a}.rewritten{color:#5b6472}
tr.chosen td{background:#f1faf4;font-weight:600}
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def word_diff(old: str, new: str, min_overlap: float = 0.4) -> str:
    """`new` with words not in `old` in <ins> and removed words in <del> (escaped HTML).

    Two unrelated answers make a diff of nothing but strike-through; below `min_overlap` (the
    matching share of words) the new answer is shown as it is, marked as rewritten."""
    a, b = re.split(r"(\s+)", old), re.split(r"(\s+)", new)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    if old.strip() and new.strip() and matcher.ratio() < min_overlap:
        return f"{_e(new)}\n<small class=rewritten>(rewritten: too different to diff)</small>"
    out = []
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            out.append(_e("".join(b[j1:j2])))
            continue
        if i2 > i1:
            out.append(f"<del>{_e(''.join(a[i1:i2]))}</del>")
        if j2 > j1:
            out.append(f"<ins>{_e(''.join(b[j1:j2]))}</ins>")
    return "".join(out)


def loss_chart(curves: dict, best_step: int | None, width: int = 1000, height: int = 300) -> str:
    """Inline SVG: training loss per step (line), held-out loss per evaluation (line + dots)."""
    train, held = curves.get("train_loss", []), curves.get("eval_loss", [])
    points = train + held
    if not points:
        return "<p>No metrics were logged for this run.</p>"
    left, right, top, bottom = 56, 16, 12, 34
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or 0.5
    y0, y1 = y0 - pad, y1 + pad

    def sx(x): return left + (x - x0) / (x1 - x0) * (width - left - right)
    def sy(y): return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="chart" role="img" aria-label="loss curves" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" '
             'xmlns="http://www.w3.org/2000/svg">']
    for k in range(5):  # horizontal grid with loss values
        y = y0 + (y1 - y0) * k / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     'stroke="#edf0f4"/>')
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for k in range(6):  # step ticks
        x = x0 + (x1 - x0) * k / 5
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                     f'{x:.0f}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - 4}" '
                 'text-anchor="middle">step</text>')
    if best_step is not None:
        parts.append(f'<line class="best" x1="{sx(best_step):.1f}" x2="{sx(best_step):.1f}" '
                     f'y1="{top}" y2="{height - bottom}" stroke="#12703a" stroke-dasharray="4 3"/>')
        near_right = sx(best_step) > width - right - 110
        parts.append(f'<text x="{sx(best_step) + (-4 if near_right else 4):.1f}" y="{top + 10}" '
                     f'text-anchor="{"end" if near_right else "start"}" fill="#12703a">best '
                     f'(step {best_step})</text>')
    for series, colour, name in ((train, "#5b8def", "train"), (held, "#e8743b", "held-out")):
        if len(series) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
            parts.append(f'<polyline class="{name}" fill="none" stroke="{colour}" '
                         f'stroke-width="2" points="{path}"/>')
        if name == "held-out":
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{colour}">'
                      f'<title>step {x}: {y:.4f}</title></circle>' for x, y in series]
    parts.append("</svg>")
    legend = ('<div class="legend"><span style="color:#5b8def">━ training loss</span>'
              '<span style="color:#e8743b">━● held-out loss</span></div>')
    return "".join(parts) + legend


def _metrics_table(report: dict) -> str:
    has_base = report["baseline"] is not None
    head = ("<tr><th>metric</th><th class=num>base</th><th class=num>tuned</th>"
            "<th class=num>change</th><th class=num>n</th></tr>" if has_base else
            "<tr><th>metric</th><th class=num>value</th><th class=num>n</th></tr>")
    rows = []
    for m in report["metrics"]:
        better = is_better(m)
        cls = {True: "good", False: "bad", None: ""}[better]
        if has_base:
            rows.append(f"<tr><td>{_e(label(m['name']))}</td>"
                        f"<td class=num>{fmt_value(m['name'], m['baseline'])}</td>"
                        f"<td class=num>{fmt_value(m['name'], m['model'])}</td>"
                        f"<td class='num {cls}'>{_e(fmt_delta(m))}</td>"
                        f"<td class=num>{m['n']}</td></tr>")
        else:
            rows.append(f"<tr><td>{_e(label(m['name']))}</td>"
                        f"<td class=num>{fmt_value(m['name'], m['model'])}</td>"
                        f"<td class=num>{m['n']}</td></tr>")
    return f"<table class=metrics>{head}{''.join(rows)}</table>"


def _answer(text: str | None) -> str:
    return f"<pre>{_e(text)}</pre>" if text and text.strip() else "<em>(empty answer)</em>"


def _checks_cell(checks: list[dict]) -> str:
    return "<br>".join(
        f"<span class={'pass' if c['passed'] else 'fail'}>{'✓' if c['passed'] else '✗'} "
        f"{_e(c['name'])}</span>" + (f" <small>{_e(c['detail'])}</small>" if c["detail"] else "")
        for c in checks)


def _examples_table(report: dict) -> str:
    has_base = report["baseline"] is not None
    order = {"worse": 0, "improved": 1, "reworded": 2, "same": 3, "n/a": 4}
    rows = sorted(report["examples"], key=lambda r: (order.get(r["change"], 5), r["index"]))
    head = ("<tr><th>#</th><th>prompt</th><th>reference</th>"
            + ("<th>base answer</th>" if has_base else "")
            + "<th>tuned answer" + (" (diff vs base)" if has_base else "") + "</th>"
            + "<th>checks</th><th class=num>ROUGE-L</th>" + ("<th>change</th>" if has_base else "")
            + "</tr>")
    body = []
    for r in rows:
        prompt = next((m["content"] for m in reversed(r["prompt"]) if m["role"] == "user"), "")
        tuned = r["model"]["answer"]
        base = r["baseline"]["answer"] if r["baseline"] else None
        diff = word_diff(base, tuned) if base is not None else _e(tuned)
        rouge = r["model"]["scores"].get("rouge_l")
        where = Path(r["where"].rsplit(":", 1)[0]).name + ":" + r["where"].rsplit(":", 1)[-1]
        cells = [f"<td class=num>{r['index'] + 1}</td>", f"<td><pre>{_e(prompt)}</pre>"
                 f"<small title='{_e(r['where'])}'>{_e(where)}</small></td>",
                 f"<td><pre>{_e(r['reference'])}</pre></td>"]
        if has_base:
            cells.append(f"<td>{_answer(base)}<div>{_checks_cell(r['baseline']['checks'])}"
                         "</div></td>")
        cells.append(f"<td><pre>{diff}</pre></td>")
        cells.append(f"<td>{_checks_cell(r['model']['checks'])}</td>")
        cells.append(f"<td class=num>{'' if rouge is None else f'{rouge:.2f}'}</td>")
        if has_base:
            cells.append(f"<td><span class='tag {_e(r['change'])}'>{_e(r['change'])}</span></td>")
        body.append(f"<tr class=example>{''.join(cells)}</tr>")
    return f"<table class=examples>{head}{''.join(body)}</table>"


def _regressions(reg: dict) -> str:
    s = reg["summary"]
    intro = (f"<p>{s['prompts']} general prompts (arithmetic, translation, facts, instructions; "
             f"Spanish and English) unrelated to the training data. <b>{s['changed']}</b> answers "
             f"changed ({s['changed_wording_only']} only in wording), mean similarity to the base "
             f"answer (ROUGE-L) {s['mean_similarity']:.2f}. Their checks pass "
             f"<b>{fmt_value('check:', s['model_checks_pass_rate'])}</b> (base "
             f"{fmt_value('check:', s['baseline_checks_pass_rate'])}). Taught format found in "
             f"<b>{s['model_leaks']}</b> answers (base {s['baseline_leaks']})"
             + (f", looking for <code>{_e(s['signature'])}</code>" if s["signature"] else "")
             + ".</p>")
    rows = []
    for it in reg["items"]:
        flag = " <span class='tag worse'>format leak</span>" if it["model_leak"] else ""
        rows.append(f"<tr class=probe><td><pre>{_e(it['prompt'])}</pre></td>"
                    f"<td>{_answer(it['baseline'])}{_checks_cell(it['baseline_checks'])}</td>"
                    f"<td><pre>{word_diff(it['baseline'], it['model'])}</pre>"
                    f"{_checks_cell(it['model_checks'])}{flag}</td>"
                    f"<td class=num>{it['similarity']:.2f}</td></tr>")
    return (intro + "<table class=probes><tr><th>prompt</th><th>base</th><th>tuned (diff)</th>"
            f"<th class=num>similarity</th></tr>{''.join(rows)}</table>"
            + _cross_system(reg.get("cross_system") or {}))


CROSS_SYSTEM_TITLES = {
    "probes_under_task_system": "General prompts under the training data's own system prompt",
    "task_under_other_system": "The task's prompts under another assistant's system prompt",
}


def _cross_system(sets: dict) -> str:
    """Leaks across system prompts: the taught format where the system prompt says otherwise."""
    parts = []
    for name, title in CROSS_SYSTEM_TITLES.items():
        found = sets.get(name)
        if not found or not found["prompts"]:
            continue
        rows = "".join(
            f"<tr class=probe><td><small>{_e(it['system'])}</small><pre>{_e(it['prompt'])}</pre>"
            f"</td><td>{_answer(it['baseline'])}</td><td>{_answer(it['model'])}"
            + (" <span class='tag worse'>format leak</span>" if it["model_leak"] else "")
            + "</td></tr>" for it in found["items"])
        parts.append(f"<h3>{_e(title)}</h3><p>Taught format in <b>{found['model_leaks']}</b> of "
                     f"{found['prompts']} answers (base {found['baseline_leaks']}).</p>"
                     "<details><summary>answers</summary><table class=probes><tr><th>prompt"
                     f"</th><th>base</th><th>tuned</th></tr>{rows}</table></details>")
    return "".join(parts)


def _tuning(tuning: dict) -> str:
    head, rows = tuning_table(tuning)
    header = "".join(f"<th class=num>{_e(h)}</th>" for h in head)
    body = "".join(f"<tr class={'chosen' if winner else 'trial'}>"
                   + "".join(f"<td class=num>{_e(c)}</td>" for c in cells) + "</tr>"
                   for cells, winner in rows)
    return (f"<p>{_e(tuning_intro(tuning))}</p>"
            f"<table class=trials><tr>{header}</tr>{body}</table>")


def _preserve(info: dict | None) -> str:
    if not info:
        return ("<p>No replay set (<code>preserve</code> off): trained on the data alone.</p>")
    variants = ", ".join(f"{n} {PRESERVE_VARIANTS.get(v, v)}" for v, n in info["variants"].items())
    return (f"<p><b>preserve</b>: {info['per_epoch']} of {info['examples']} replay examples per "
            f"epoch, the base model's own answers ({variants}), each weighing at most one task "
            f"example (mean token weight {info['mean_weight']}).</p>")


PRESERVE_VARIANTS = {"none": "general prompts without a system prompt",
                     "other": "under other assistants' system prompts",
                     "data": "under the data's own system prompt",
                     "task": "of the data's prompts under other system prompts"}


def render_html(report: dict) -> str:
    model, base = report["model"], report["baseline"]
    title = f"afinar report: {model['spec']}"
    meta = (f"data: {_e(report['data']['source'])} · {report['data']['examples']} examples"
            + (f" · compared with {_e(base['spec'])}" if base else "")
            + f" · {_e(report['created_at'])}")
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
             f"<meta name=viewport content='width=device-width,initial-scale=1'>"
             f"<style>{_CSS}</style></head><body><main>",
             f"<h1>{_e(title)}</h1><p class=meta>{meta}</p>"]
    parts += [f"<div class=warn>⚠ {_e(w)}</div>" for w in report["warnings"]]
    parts.append(f"<section id=metrics><h2>Metrics</h2>{_metrics_table(report)}")
    changes = report.get("changes")
    if changes:
        parts.append(f"<p>Per example: <span class='tag improved'>{changes['improved']} improved"
                     f"</span> <span class='tag worse'>{changes['worse']} worse</span> "
                     f"<span class='tag reworded'>{changes['reworded']} reworded</span> "
                     f"<span class='tag same'>{changes['same']} identical</span></p>")
    parts.append("</section>")
    training = report.get("training")
    if training:
        d = training["diagnosis"]
        parts.append(f"<section id=training><h2>Training</h2>"
                     f"{loss_chart(training['curves'], d.get('best_step'))}"
                     f"<p><b>Diagnosis: {_e(d['verdict'].replace('_', ' '))}.</b> "
                     f"{_e(d['message'])}.</p>{_preserve(training.get('preserve'))}</section>")
    if report.get("tuning"):
        parts.append(f"<section id=tuning><h2>Hyperparameter search</h2>"
                     f"{_tuning(report['tuning'])}</section>")
    if report.get("preference"):
        text = "</p><p>".join(_e(line) for line in preference_markdown(report["preference"])[3:])
        parts.append(f"<section id=preference><h2>Preference pairs</h2><p>{text}</p></section>")
    if report.get("regressions"):
        parts.append(f"<section id=regressions><h2>What did it break</h2>"
                     f"{_regressions(report['regressions'])}</section>")
    parts.append(f"<section id=examples><h2>Examples ({len(report['examples'])})</h2>"
                 "<p>Worse first, then improved. In the tuned answer, <ins>added</ins> and "
                 f"<del>removed</del> words are relative to the base answer.</p>"
                 f"{_examples_table(report)}</section>")
    parts.append("</main></body></html>\n")
    return "".join(parts)
