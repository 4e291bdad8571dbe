"""Frozen base weights stored in the compute dtype (bf16) vs fp32 weights recast by autocast at
every matmul, on the embedded model, LoRA, the bundled example; fp32 training beside them.

    .venv/bin/python bench/bench_frozen_dtype.py [--steps 12] [--repeats 2]

Each variant trains in a child process of its own (peak RSS is the child's), alternating
variants `--repeats` times (medians). Prints tokens/s (forward + backward + optimizer time),
peak RSS and the ratios; writes bench/results/frozen_dtype-<cpu kind>.json. On a CPU without
native bf16, bf16 itself is slow (precision auto picks fp32 there, so nothing changes for it);
the memory saving holds on every CPU. Numbers are for reading, never for assertions.
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
# variant -> (precision, frozen linears stored in the compute dtype, freed memory returned)
VARIANTS = {"fp32": ("fp32", True, True), "fp32-keep-freed": ("fp32", True, False),
            "bf16-recast": ("bf16", False, True), "bf16-stored": ("bf16", True, True)}


def _child(variant: str, steps: int, out: str) -> None:
    from afinar.config import load_train_config
    from afinar.train import loop

    precision, store, trim = VARIANTS[variant]
    if not store:
        loop.frozen_linear_dtype = lambda *args: None
    if not trim:  # glibc's default allocator behaviour (see train/host_memory.py)
        loop.return_freed_memory = lambda: False
    config = load_train_config(ROOT / "examples" / "soporte-triaje" / "train.yaml",
                               [f"max_steps={steps}", f"precision={precision}", "evaluate=false",
                                "held_out_fraction=0", "save_steps=1000"], output=out)
    summary = loop.train(config).summary
    print(json.dumps({"tokens_per_s": summary["tokens_per_s"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "final_train_loss": summary["final_train_loss"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="Which variants to run (bf16 ones are slow on CPUs without it).")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.steps, args.out)
        return

    from afinar.models.load import cpu_has_fast_bf16

    kind = "bf16" if cpu_has_fast_bf16() else "no-bf16"
    runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.repeats):
            for variant in runs:
                done = subprocess.run([sys.executable, __file__, "--child", variant, "--steps",
                                       str(args.steps), "--out", f"{scratch}/{variant}-{r}"],
                                      capture_output=True, text=True)
                if done.returncode:
                    sys.exit(done.stderr[-2000:])
                runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(variant, runs[variant][-1], flush=True)
    rows = {v: {k: round(statistics.median(r[k] for r in got), 3) for k in got[0]}
            for v, got in runs.items()}
    result = {"cpu_native_bf16": kind == "bf16", "steps": args.steps, "variants": rows}
    for new, old in (("bf16-stored", "bf16-recast"), ("fp32", "fp32-keep-freed")):
        if new in rows and old in rows:
            for key in ("tokens_per_s", "peak_rss_mb"):
                result[f"{new}_vs_{old}_{key}"] = round(rows[new][key] / rows[old][key], 3)
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / f"frozen_dtype-{kind}-{'-'.join(sorted(runs))}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
