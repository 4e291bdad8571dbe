"""What `afinar train --data FILE` teaches with nothing else set: before and after the defaults
of issue 12 (auto learning rate and epochs from the model and the data, `preserve`), on the
three bundled example tasks, in one run.

    python bench/bench_defaults.py                       # all tasks, both variants (~30 min, 2 cores)
    python bench/bench_defaults.py --tasks ticket-routing --variants after
    python bench/bench_defaults.py --tasks ticket-routing \
        --variants after-no-preserve,after-no-task-prompts,after-no-data-system  # preserve ablation
    python bench/bench_defaults.py --smoke --out PATH [--model DIR]   # does it still run?

Per task and variant: held-out format adherence; exact and normalised match of the answers'
rule-fixed part (soporte-triaje: the category and priority lines; the others: the whole answer);
taught-format leaks into ordinary held-out prompts (outside the task's scope), the general probes,
the probes asked under the task's own system prompt, the task's prompts under another system
prompt, and the other two tasks' prompts under their own system prompts; the general probes'
check pass rate against the base model's; training time. Writes bench/results/defaults.json
(`--out`); the runs go under `--runs` (default runs/bench-defaults). `--smoke`: ticket-routing,
"after", 2 steps, on a tiny random model (or --model), runs in a temporary folder
(bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import _smoke  # noqa: E402

from afinar import TrainConfig, train  # noqa: E402
from afinar.data.prepare import split_for  # noqa: E402
from afinar.data.validate import load_examples  # noqa: E402
from afinar.evaluation.checks import load_checks  # noqa: E402
from afinar.evaluation.metrics import normalize  # noqa: E402

TASKS = {
    "soporte-triaje": lambda a: "\n".join(a.strip().splitlines()[:2]),  # category + priority
    "ticket-routing": lambda a: a.strip(),
    "alertas-guardia": lambda a: a.strip(),
}
# "before": what `afinar train --data FILE` did until issue 12 (the 7B-recipe LoRA learning rate,
# at least 200 example-passes, no replay).
VARIANTS = {
    "before": {"learning_rate": 2e-4, "preserve": False, "epochs": "old-auto"},
    "after": {},
    "after-no-data-system": {"preserve_data_system": False},
    "after-no-preserve": {"preserve": False},
    "after-no-task-prompts": {"preserve_task_prompts": 0.0},
}


def _old_auto_epochs(n_train: int) -> int:
    return min(25, max(3, math.ceil(200 / n_train)))


def _task_files(task: str) -> tuple[Path, Path]:
    folder = ROOT / "examples" / task
    return folder / "data.jsonl", folder / "checks.yaml"


def _held_out(task: str):
    data, _ = _task_files(task)
    config = TrainConfig(data=str(data))
    _, held, _ = split_for(config, load_examples(data))
    return held


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _leaks(answers: list[str], signature: str) -> int:
    return sum(bool(re.search(signature, a)) for a in answers)


def _cross_task(run: Path, task: str, signature: str) -> tuple[int, int]:
    """The other tasks' held-out prompts (with their own system prompts) answered by this run."""
    from afinar.infer.generate import GenerationSettings, load

    prompts = []
    for other in TASKS:
        if other == task:
            continue
        for ex in _held_out(other):
            if any(m.role == "system" for m in ex.messages):
                prompts.append([{"role": m.role, "content": m.content}
                                for m in ex.prompt_messages()])
    model = load(str(run), notify=lambda m: None)
    answers = model.generate(prompts, GenerationSettings(max_new_tokens=64), batch_size=32)
    return _leaks(answers, signature), len(answers)


def measure(task: str, variant: str, out_root: Path, **settings) -> dict:
    """`settings`: more TrainConfig values (the model, a step limit)."""
    data, checks_file = _task_files(task)
    overrides = {**settings, **VARIANTS[variant]}
    if overrides.get("epochs") == "old-auto":
        total = len(load_examples(data).examples)
        n_train = total - len(_held_out(task))
        overrides["epochs"] = _old_auto_epochs(n_train)
    run = out_root / f"{task}-{variant}"
    config = TrainConfig(data=str(data), checks=str(checks_file), output=str(run), **overrides)
    started = time.perf_counter()
    result = train(config)
    wall = time.perf_counter() - started
    report = json.loads((run / "report.json").read_text())
    summary = result.summary
    checks = load_checks(checks_file)
    signature = report["regressions"]["summary"]["signature"] or checks.leak_regex
    fixed = TASKS[task]
    in_scope, ordinary = [], []
    for row in report["examples"]:
        system = "\n".join(m["content"] for m in row["prompt"] if m["role"] == "system")
        scope = checks.specs[0].when
        belongs = scope is None or (scope.system_contains or "") in system and system
        (in_scope if belongs else ordinary).append(row)
    exact = sum(fixed(r["model"]["answer"]) == fixed(r["reference"]) for r in in_scope)
    norm = sum(normalize(fixed(r["model"]["answer"])) == normalize(fixed(r["reference"]))
               for r in in_scope)
    adherence = [c["passed"] for r in in_scope for c in r["model"]["checks"]
                 if c["name"] == "format_adherence"]
    reg = report["regressions"]
    cross = reg["cross_system"]
    task_leaks, task_n = _cross_task(run, task, signature)
    preserve = (json.loads((run / "data_report.json").read_text()).get("preserve") or {})
    return {
        "task": task, "variant": variant,
        "learning_rate": summary["learning_rate"],
        "epochs": summary["epochs"], "steps": summary["steps"],
        "train_seconds": summary["train_seconds"], "wall_seconds": round(wall, 1),
        "replay_seconds": preserve.get("seconds"), "replay_per_epoch": preserve.get("per_epoch"),
        "tokens_per_s": round(summary["tokens_per_s"], 1),
        "held_out_task": len(in_scope), "held_out_ordinary": len(ordinary),
        "format_adherence": _rate(sum(adherence), len(adherence)),
        "exact_match": _rate(exact, len(in_scope)), "normalized_match": _rate(norm, len(in_scope)),
        "leaks_ordinary": _rate(_leaks([r["model"]["answer"] for r in ordinary], signature),
                                len(ordinary)),
        "leaks_general": _rate(reg["summary"]["model_leaks"], reg["summary"]["prompts"]),
        "leaks_general_base": _rate(reg["summary"]["baseline_leaks"], reg["summary"]["prompts"]),
        "leaks_task_system": _rate(cross["probes_under_task_system"]["model_leaks"],
                                   cross["probes_under_task_system"]["prompts"]),
        "leaks_other_system": _rate(cross["task_under_other_system"]["model_leaks"],
                                    cross["task_under_other_system"]["prompts"]),
        "leaks_other_tasks": _rate(task_leaks, task_n),
        "general_checks": reg["summary"]["model_checks_pass_rate"],
        "general_checks_base": reg["summary"]["baseline_checks_pass_rate"],
    }


def _fmt(value) -> str:
    if value is None:
        return "  -  "
    if isinstance(value, float) and value <= 1.0:
        return f"{value:5.0%}"
    return f"{value:>5}"


def print_table(rows: list[dict]) -> None:
    cols = [("task", 16), ("variant", 22), ("epochs", 6), ("steps", 5), ("train_seconds", 7),
            ("format_adherence", 7), ("exact_match", 7), ("normalized_match", 7),
            ("leaks_ordinary", 7), ("leaks_general", 7), ("leaks_task_system", 7),
            ("leaks_other_system", 7), ("leaks_other_tasks", 7), ("general_checks", 7),
            ("general_checks_base", 7)]
    short = {"train_seconds": "train s", "format_adherence": "format", "exact_match": "exact",
             "normalized_match": "norm", "leaks_ordinary": "lk ord", "leaks_general": "lk gen",
             "leaks_task_system": "lk tsys", "leaks_other_system": "lk osys",
             "leaks_other_tasks": "lk otsk", "general_checks": "gen ck",
             "general_checks_base": "base ck"}
    print(" ".join(f"{short.get(c, c):>{w}}" for c, w in cols))
    for row in rows:
        print(" ".join(f"{_fmt(row[c]) if not isinstance(row[c], str) else row[c]:>{w}}"
                       for c, w in cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", help=f"default {','.join(TASKS)}; --smoke: ticket-routing")
    parser.add_argument("--variants", help="default before,after; --smoke: after")
    parser.add_argument("--model", help="default the TrainConfig default (the embedded model); "
                        "--smoke: a tiny random model")
    parser.add_argument("--runs", help="folder for the runs, emptied first (default "
                        "runs/bench-defaults; --smoke: a temporary folder)")
    # --results: this option's name until the benchmarks' --smoke convention (--out = results).
    parser.add_argument("--out", "--results", dest="out",
                        help="the results file (default bench/results/defaults.json)")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "defaults.json")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tasks = args.tasks or ("ticket-routing" if args.smoke else ",".join(TASKS))
    variants = args.variants or ("after" if args.smoke else "before,after")
    settings = {"model": _smoke.smoke_model(args.model) if args.smoke else args.model}
    if args.smoke:
        settings["max_steps"] = 2
    settings = {k: v for k, v in settings.items() if v is not None}
    if args.runs or not args.smoke:
        out_root = Path(args.runs or "runs/bench-defaults")
        if out_root.exists():
            import shutil

            shutil.rmtree(out_root)
    else:
        out_root = _smoke.scratch("afinar-smoke-defaults-")
    rows = []
    for task in tasks.split(","):
        for variant in variants.split(","):
            print(f"== {task} / {variant}", flush=True)
            rows.append(measure(task, variant, out_root, **settings))
            print_table(rows[-1:])
    print()
    print_table(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"smoke": args.smoke, **settings, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
