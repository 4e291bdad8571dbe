"""Frozen base weights stored in the compute dtype (bf16) vs fp32 weights recast by autocast at
every matmul, on the embedded model, LoRA, the bundled example; fp32 training beside them.

    .venv/bin/python bench/bench_frozen_dtype.py [--steps 12] [--repeats 2]
    .venv/bin/python bench/bench_frozen_dtype.py --smoke --out PATH [--model DIR]  # still runs?

Each variant trains in a child process of its own (peak RSS is the child's), alternating
variants `--repeats` times (medians). Prints tokens/s (forward + backward + optimizer time),
peak RSS and the ratios; writes bench/results/frozen_dtype-<cpu kind>.json. On a CPU without
native bf16, bf16 itself is slow (precision auto picks fp32 there, so nothing changes for it);
the memory saving holds on every CPU. Numbers are for reading, never for assertions. `--smoke`:
the two bf16 variants once, one step, on a tiny random model (or --model) (bench/_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

# variant -> (precision, frozen linears stored in the compute dtype, freed memory returned)
VARIANTS = {"fp32": ("fp32", True, True), "fp32-keep-freed": ("fp32", True, False),
            "bf16-recast": ("bf16", False, True), "bf16-stored": ("bf16", True, True)}


def _child(variant: str, steps: int, out: str, model: str | None) -> None:
    from afinar.config import load_train_config
    from afinar.train import recipe

    for name in ("frozen_linear_dtype", "return_freed_memory"):  # what the variants replace
        if not callable(getattr(recipe, name, None)):
            sys.exit(f"afinar.train.recipe.{name} is gone: update this benchmark's variants")
    precision, store, trim = VARIANTS[variant]
    if not store:
        recipe.frozen_linear_dtype = lambda *args: None
    if not trim:  # glibc's default allocator behaviour (see train/host_memory.py)
        recipe.return_freed_memory = lambda: False
    config = load_train_config(ROOT / "examples" / "soporte-triaje" / "train.yaml",
                               [f"max_steps={steps}", f"precision={precision}", "evaluate=false",
                                "held_out_fraction=0", "save_steps=1000"], output=out,
                               model=model)
    summary = recipe.train(config).summary
    print(json.dumps({"tokens_per_s": summary["tokens_per_s"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "final_train_loss": summary["final_train_loss"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, help="default 12; --smoke: 1")
    parser.add_argument("--repeats", type=int, help="default 2; --smoke: 1")
    parser.add_argument("--variants", help="Which variants to run (bf16 ones are slow on CPUs "
                        "without it; default all; --smoke: bf16-recast,bf16-stored).")
    parser.add_argument("--model", help="default the example's (smollm2-135m-instruct); --smoke: "
                        "a tiny random model")
    parser.add_argument("--out", help="default bench/results/frozen_dtype-<cpu kind>-"
                        "<variants>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    _smoke.add_flag(parser)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.steps, args.child_out, args.model)
        return
    out = _smoke.out_path(parser, args, None)
    args.steps = args.steps or (1 if args.smoke else 12)
    args.repeats = args.repeats or (1 if args.smoke else 2)
    args.variants = args.variants or ("bf16-recast,bf16-stored" if args.smoke
                                      else ",".join(VARIANTS))
    model = _smoke.smoke_model(args.model) if args.smoke else args.model

    from afinar.models.load import cpu_has_fast_bf16

    kind = "bf16" if cpu_has_fast_bf16() else "no-bf16"
    runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.repeats):
            for variant in runs:
                done = subprocess.run([sys.executable, __file__, "--child", variant, "--steps",
                                       str(args.steps), "--child-out", f"{scratch}/{variant}-{r}",
                                       *(["--model", model] if model else [])],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(done.stderr[-2000:])
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(variant, runs[variant][-1], flush=True)
    rows = {v: {k: round(statistics.median(r[k] for r in got), 3) for k in got[0]}
            for v, got in runs.items()}
    result = {"smoke": args.smoke, "model": model, "cpu_native_bf16": kind == "bf16",
              "steps": args.steps, "variants": rows}
    for new, old in (("bf16-stored", "bf16-recast"), ("fp32", "fp32-keep-freed")):
        if new in rows and old in rows:
            for key in ("tokens_per_s", "peak_rss_mb"):
                result[f"{new}_vs_{old}_{key}"] = round(rows[new][key] / rows[old][key], 3)
    print(json.dumps(result, indent=1))
    out = out or ROOT / "bench" / "results" / f"frozen_dtype-{kind}-{'-'.join(sorted(runs))}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
