""""What did it break": bundled general prompts answered by the base and the tuned model.

Fine-tuning on a narrow task can change how a model answers everything else. The probes
(probes/general.jsonl: arithmetic, translation, short facts, instruction following; Spanish and
English) are unrelated to any training set; each answer is compared across the two models, the
probes' own checks are scored for both, and answers carrying the taught format's signature are
counted as leaks.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from afinar.data.example import Example
from afinar.data.stats import system_prompts_by_use
from afinar.data.validate import load_examples
from afinar.evaluation.checks import example_checks, run_check
from afinar.evaluation.metrics import normalize, rouge_l

PROBES_FILE = Path(__file__).parent / "probes" / "general.jsonl"
# A label ("Categoría:", "Answer:") starting a line: how structured output formats look.
_LABEL = re.compile(r"^\s*([^\W\d_][\w ]{0,30}?)\s*:", re.MULTILINE)


def load_probes() -> list[Example]:
    return load_examples(PROBES_FILE, for_training=False).examples


def format_signature(references: list[str], explicit: str | None = None,
                     share: float = 0.6) -> str | None:
    """A regex that finds the taught format in an answer: the checks file's `leak_regex`, else
    the line labels found in at least `share` of the labelled reference answers (None when the
    references have no such structure, e.g. free prose)."""
    if explicit:
        return explicit
    answers = [r for r in references if r and r.strip()]
    if not answers:
        return None
    # Data often mixes the taught format with ordinary answers (as it should): look at the
    # labelled answers, if they are a real part of the data.
    # An answer is structured when two or more of its lines start with a label (one "Note:"
    # in prose is not a format; a single-label format can be declared as leak_regex).
    labelled = [{lbl.strip() for lbl in _LABEL.findall(a)} for a in answers]
    labelled = [found for found in labelled if len(found) >= 2]
    if len(labelled) < 0.3 * len(answers):
        return None
    counts = Counter(lbl for found in labelled for lbl in found)
    labels = sorted(lbl for lbl, n in counts.items() if n >= share * len(labelled))
    if not labels:
        return None
    return "(?m)^\\s*(" + "|".join(re.escape(lbl) for lbl in labels) + ")\\s*:"


def compare_probes(probes: list[Example], tuned: list[str], base: list[str],
                   signature: str | None) -> dict:
    """Per probe: both answers, whether they changed, check scores, leaks; then the totals."""
    items = []
    for probe, t, b in zip(probes, tuned, base):
        checks = [run_check(spec, ans) for ans in (t, b)
                  for spec in example_checks(probe)]
        half = len(checks) // 2
        item = {
            "prompt": probe.messages[-1].content,
            "language": probe.extra.get("language"),
            "model": t, "baseline": b,
            "identical": t.strip() == b.strip(),
            "same_meaning": normalize(t) == normalize(b),
            "similarity": rouge_l(t, b),
            "model_checks": [vars(c) for c in checks[:half]],
            "baseline_checks": [vars(c) for c in checks[half:]],
            "model_leak": bool(signature and re.search(signature, t)),
            "baseline_leak": bool(signature and re.search(signature, b)),
        }
        items.append(item)
    n = len(items)

    def rate(key: str) -> float | None:
        scores = [c["score"] for it in items for c in it[key]]
        return sum(scores) / len(scores) if scores else None

    changed = sum(not it["identical"] for it in items)
    summary = {
        "prompts": n, "identical": n - changed, "changed": changed,
        "changed_wording_only": sum(not it["identical"] and it["same_meaning"] for it in items),
        "mean_similarity": sum(it["similarity"] for it in items) / n if n else None,
        "model_checks_pass_rate": rate("model_checks"),
        "baseline_checks_pass_rate": rate("baseline_checks"),
        "model_leaks": sum(it["model_leak"] for it in items),
        "baseline_leaks": sum(it["baseline_leak"] for it in items),
        "signature": signature,
    }
    warnings = []
    new_leaks = summary["model_leaks"] - summary["baseline_leaks"]
    if new_leaks > 0:
        warnings.append(f"the taught format leaks into unrelated prompts: {new_leaks} of {n} "
                        "general prompts now get it (see 'What did it break'); add ordinary "
                        "examples without the format to the training data")
    mc, bc = summary["model_checks_pass_rate"], summary["baseline_checks_pass_rate"]
    if mc is not None and bc is not None and mc < bc - 0.1:
        warnings.append(f"general skills dropped: the probes' checks pass {mc:.0%} of the time "
                        f"against {bc:.0%} for the base model")
    return {"summary": summary, "warnings": warnings, "items": items}


# --- leaks across system prompts ---------------------------------------------------------------
# A format is tied to a system prompt in the data; it leaks when it shows up (1) for prompts that
# do not belong to the task asked under the task's own system prompt, or (2) for the task's own
# prompts asked under another assistant's system prompt. Neither set is trained on: the system
# prompts below are not in the replay set (data/preserve), the probes are not its prompts.
OTHER_SYSTEMS_FILE = Path(__file__).parent / "probes" / "other_systems.json"
PROBES_PER_SYSTEM = 12
MAX_SYSTEMS = 2
MAX_MOVED = 16


def cross_system_prompts(examples: list[Example], probes: list[Example]) -> dict[str, list]:
    """{"probes_under_task_system": [...], "task_under_other_system": [...]}: each a list of
    (label, messages) to be answered by both models."""
    systems = system_prompts_by_use(examples)[:MAX_SYSTEMS]
    picked = probes[::max(1, len(probes) // PROBES_PER_SYSTEM)][:PROBES_PER_SYSTEM]
    under_task = [(p.messages[-1].content,
                   [{"role": "system", "content": s},
                    *({"role": m.role, "content": m.content} for m in p.prompt_messages()
                      if m.role != "system")])
                  for s in systems for p in picked]
    others = json.loads(OTHER_SYSTEMS_FILE.read_text(encoding="utf-8"))
    moved = []
    for ex in [ex for ex in examples if ex.system_prompt in systems][:MAX_MOVED]:
        rest = [{"role": m.role, "content": m.content} for m in ex.prompt_messages()
                if m.role != "system"]
        moved.append((rest[-1]["content"] if rest else "",
                      [{"role": "system", "content": others[len(moved) % len(others)]}, *rest]))
    return {"probes_under_task_system": under_task, "task_under_other_system": moved}


PRESERVE_ADVICE = "`preserve` (on by default for LoRA) trains against this"
# Preference runs have no replay set: the pairs themselves must show where the style belongs.
PREFERENCE_ADVICE = ("preference pairs all under one system prompt teach the style everywhere; "
                     "add pairs under other system prompts (or none) whose chosen answer is the "
                     "ordinary one")


def compare_cross_system(sets: dict[str, list], tuned: dict[str, list[str]],
                         base: dict[str, list[str]], signature: str | None,
                         advice: str = PRESERVE_ADVICE) -> dict:
    """Leak counts for each set, per model, with the prompts and answers; `advice` ends each
    warning."""
    out: dict = {}
    warnings = []
    for name, prompts in sets.items():
        items = [{"prompt": label, "system": messages[0]["content"], "model": t, "baseline": b,
                  "model_leak": bool(signature and re.search(signature, t)),
                  "baseline_leak": bool(signature and re.search(signature, b))}
                 for (label, messages), t, b in zip(prompts, tuned[name], base[name])]
        leaks = sum(it["model_leak"] for it in items)
        base_leaks = sum(it["baseline_leak"] for it in items)
        out[name] = {"prompts": len(items), "model_leaks": leaks, "baseline_leaks": base_leaks,
                     "items": items}
        if items and leaks > base_leaks:
            what = {"probes_under_task_system": "general prompts asked under the training "
                    "data's own system prompt",
                    "task_under_other_system": "the task's prompts asked under another "
                    "assistant's system prompt"}[name]
            warnings.append(f"the taught format leaks across system prompts: {leaks} of "
                            f"{len(items)} {what} get it (base {base_leaks}); {advice}")
    out["signature"] = signature
    return {"sets": out, "warnings": warnings}
