"""The plan (`afinar plan`, plan.json) against what the loop then does, on every precision path.

    .venv/bin/python bench/bench_plan.py [--cases smollm2-135m:fp32-eager,demo:bf16-compiled,...]
                                         [--steps 3] [--max-seq-length 128] [--batch-size 2]
                                         [--out bench/results/plan-<device>.json]
    .venv/bin/python bench/bench_plan.py --smoke --out PATH     # does it still run? (seconds)

A case is SHAPE:PATH. Paths (what the loop runs; see train/loop.py):
  fp32-eager, bf16-eager             LoRA on fp32 / bf16-stored frozen linears, bf16 autocast
  fp32-compiled, bf16-compiled       the same with `compile: true` (Inductor per decoder layer)
  4bit-fp32, 4bit-bf16               QLoRA (bitsandbytes NF4) with fp32 / bf16 compute, eager
  4bit-fp32-compiled, 4bit-bf16-compiled
  lora, 4bit                         older names: fp32-eager and 4bit-fp32
Shapes: smollm2-135m (the embedded SmolLM2-135M-Instruct, its real fp32 weights), demo (the same
model with examples/soporte-triaje/train.yaml's own settings: batch 4, max_seq_length 512,
preserve, a held-out split evaluated before and after; what scripts/demo.sh trains), and
llama-3.2-1b, qwen2.5-3b, llama-3-8b built from their published configurations with random
weights, saved once in bf16 (the dtype they are distributed in) under AFINAR_HOME/bench-shapes.
Nothing is downloaded: the embedded tokenizer is used (its ids are valid in the larger
vocabularies).

Each case trains `--steps` steps on the bundled example with `afinar train`'s own code in a
child process of its own, and compares the plan the run wrote (plan.json) with what it measured
(run.json's summary): peak memory (peak resident memory on a CPU, the process's whole life up to
the end of the steps; peak allocated memory on a GPU), tokens/s, and the training seconds of the
steps it ran (the plan's time for a whole run, scaled to the steps run). The child also records
its peak before the first step (the loading peak) and its resident memory after every step.
Numbers are for reading, never for assertions.

`--smoke`: two short cases (fp32 eager, 4-bit bf16) on a tiny random model, 2 steps
(bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

DATA = ROOT / "examples" / "soporte-triaje" / "data.jsonl"
DEMO_CONFIG = ROOT / "examples" / "soporte-triaje" / "train.yaml"

# Published shapes (config.json of meta-llama/Llama-3.2-1B and Qwen/Qwen2.5-3B), written here.
SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}),
    "qwen2.5-3b": dict(
        model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}

# path -> (precision, compile, quantization)
PATHS = {
    "fp32-eager": ("fp32", False, "none"), "bf16-eager": ("bf16", False, "none"),
    "fp32-compiled": ("fp32", True, "none"), "bf16-compiled": ("bf16", True, "none"),
    "4bit-fp32": ("fp32", False, "4bit"), "4bit-bf16": ("bf16", False, "4bit"),
    "4bit-fp32-compiled": ("fp32", True, "4bit"), "4bit-bf16-compiled": ("bf16", True, "4bit"),
}
ALIASES = {"lora": "fp32-eager", "4bit": "4bit-fp32"}
DEFAULT_CASES = ",".join(
    [f"smollm2-135m:{p}" for p in PATHS] + ["demo:bf16-compiled", "demo:fp32-eager"]
    + [f"llama-3.2-1b:{p}" for p in ("fp32-eager", "bf16-eager", "4bit-fp32", "4bit-bf16")]
    + [f"qwen2.5-3b:{p}" for p in ("bf16-eager", "4bit-bf16", "4bit-fp32", "fp32-eager")])
SMOKE_CASES = "tiny:fp32-eager,tiny:4bit-bf16"
# The larger shapes at a shorter length: their steps are slow on 2 cores (see bench/README.md).
SHAPE_SETTINGS = {"qwen2.5-3b": {"max_seq_length": 64, "batch_size": 1}}


def shape_folder(name: str, smoke_model: str | None = None) -> str:
    """The embedded model's name, the smoke model, or a folder with the shape's random bf16
    weights."""
    if name in ("smollm2-135m", "demo"):
        return "smollm2-135m-instruct"
    if name == "tiny":
        return smoke_model
    from afinar.paths import afinar_home

    folder = afinar_home() / "bench-shapes" / name
    if not (folder / "config.json").is_file():
        # A process of its own: building the model must not count in a measured peak.
        subprocess.run([sys.executable, __file__, "--build", name, "--build-out", str(folder)],
                       check=True)
    return str(folder)


def _build(name: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from afinar.models.load import load_tokenizer
    from afinar.models.registry import resolve_model

    values = dict(SHAPES[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=Path(out).parent))
    model.save_pretrained(tmp)
    load_tokenizer(resolve_model("smollm2-135m-instruct", notify=print).weights
                   ).save_pretrained(tmp)
    tmp.rename(out)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_parts_mb() -> dict:
    """Resident memory by kind: anonymous (the heap, tensors) and file-backed (mapped
    checkpoints, libraries)."""
    parts = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                parts[key.lower().replace("rss", "") + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    return parts


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _child(args) -> None:
    from afinar.config import load_train_config
    from afinar.train.recipe import train

    shape, path = args.child_case.split(":")
    precision, compiled, quantization = PATHS[path]
    sets = [f"max_steps={args.steps}", "evaluate=false", "save_steps=1000",
            f"precision={precision}", f"compile={str(compiled).lower()}",
            f"quantization={quantization}"]
    if shape == "demo":  # the demo's own settings, but for the number of steps
        config = load_train_config(DEMO_CONFIG, sets, output=args.run_dir)
    else:
        sets += ["held_out_fraction=0", f"max_seq_length={args.max_seq_length}",
                 f"batch_size={args.batch_size}", "gradient_checkpointing=false",
                 "preserve=false"]
        config = load_train_config(None, sets, data=str(DATA), model=args.child_model,
                                   output=args.run_dir)
    if args.warm:
        # The plan's step probe (plan/speed.py) measures this shape once per machine and caches
        # it: done here, in a process of its own, it does not run inside the measured one.
        from afinar.plan.run import plan_command

        plan_command(config)
        return
    marks: dict = {"steps": []}
    started = time.perf_counter()

    def on_event(event: dict) -> None:
        kind = event.get("type")
        if kind == "start":  # weights loaded, adapter attached, optimizer built
            marks["before_steps"] = {"peak_mb": round(_maxrss_mb(), 1),
                                     "rss_mb": round(_rss_mb(), 1), **_rss_parts_mb()}
        elif kind == "step":
            marks["steps"].append({"step": event["step"], "elapsed_s": event["elapsed_s"],
                                   "tokens_seen": event["tokens_seen"],
                                   "rss_mb": round(_rss_mb(), 1),
                                   "peak_mb": round(_maxrss_mb(), 1), **_rss_parts_mb()})
        elif kind == "log" and "preserve: the base model answers" in event.get("message", ""):
            marks["preserve_generated"] = True  # the answer cache was cold: generation ran
        elif kind == "log" and event.get("message", "").startswith("plan: peak"):
            marks["at_plan"] = {"peak_mb": round(_maxrss_mb(), 1), "rss_mb": round(_rss_mb(), 1),
                                **_rss_parts_mb()}

    result = train(config, on_event=on_event)
    summary = result.summary
    plan = json.loads((Path(result.run_dir) / "plan.json").read_text())
    per_epoch = math.ceil(math.ceil(plan["data"]["train_examples"] / config.batch_size)
                          / config.gradient_accumulation_steps)
    planned_steps = max(1, plan["data"]["epochs"] * per_epoch)
    steps = summary["steps"]
    step_seconds = summary["tokens_seen"] / max(1e-9, summary["tokens_per_s"])
    # Steady state: from the end of step 1 (which holds a compiled run's compile) to the end of
    # the last step, over the tokens of steps 2..N.
    first, last = marks["steps"][0], marks["steps"][-1]
    steady = ((last["tokens_seen"] - first["tokens_seen"])
              / max(1e-9, last["elapsed_s"] - first["elapsed_s"])) if len(marks["steps"]) > 1 \
        else summary["tokens_per_s"]
    print("RESULT " + json.dumps({
        "planned_peak_mb": plan["peak_memory_mb"], "measured_peak_mb": summary["peak_memory_mb"],
        "planned_parts_mb": plan["settings"]["memory_mb"],
        "planned_loading_mb": plan["settings"].get("loading_mb"),
        "measured_at_plan": marks.get("at_plan"),
        "measured_before_steps": marks.get("before_steps"), "measured_steps": marks["steps"],
        "preserve_generated": marks.get("preserve_generated", False),
        "planned_tokens_per_s": plan["time"]["tokens_per_s"],
        "measured_tokens_per_s": round(summary["tokens_per_s"], 2),
        "measured_steady_tokens_per_s": round(steady, 2),
        "planned_compile_seconds": plan["time"].get("compile_seconds"),
        "planned_train_seconds_for_steps": round(
            plan["time"]["train_seconds"] * steps / planned_steps, 1),
        "measured_step_seconds": round(step_seconds, 1),
        "measured_train_seconds": summary["train_seconds"],
        "process_seconds": round(time.perf_counter() - started, 1),
        "steps": steps, "tokens_seen": summary["tokens_seen"],
        "batch_size": config.batch_size, "max_seq_length": config.max_seq_length,
        "longest_example": plan["data"]["longest_example"],
        "precision": summary["precision"], "quantization": summary["quantization"],
        "compiled": summary["compiled"], "preserve": summary["preserve"],
        "gradient_checkpointing": summary["gradient_checkpointing"]}))


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def run_case(case: str, args, smoke_model: str | None) -> dict | None:
    shape, path = case.split(":")
    path = ALIASES.get(path, path)
    if path not in PATHS:
        raise SystemExit(f"{case}: unknown path {path!r}; one of {', '.join(PATHS)}")
    model = shape_folder(shape, smoke_model)
    settings = {"max_seq_length": args.max_seq_length, "batch_size": args.batch_size,
                **SHAPE_SETTINGS.get(shape, {})}
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, __file__, "--child-case", f"{shape}:{path}", "--child-model",
                   model, "--steps", str(args.steps), "--max-seq-length",
                   str(settings["max_seq_length"]), "--batch-size", str(settings["batch_size"]),
                   "--run-dir", str(Path(scratch) / "run")]
        subprocess.run(command + ["--warm"], capture_output=True, text=True, env=env)
        run = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        print(f"{case}: failed\n{run.stdout[-1500:]}\n{run.stderr[-3000:]}", flush=True)
        return None
    r = {"case": f"{shape}:{path}", **json.loads(lines[-1][7:])}
    r["plan_over_measured"] = _ratio(r["planned_peak_mb"], r["measured_peak_mb"])
    r["tokens_per_s_plan_over_measured"] = _ratio(r["planned_tokens_per_s"],
                                                  r["measured_tokens_per_s"])
    r["train_seconds_plan_over_measured"] = _ratio(r["planned_train_seconds_for_steps"],
                                                   r["measured_step_seconds"])
    print(f"{r['case']:28s} peak planned {r['planned_peak_mb']:>8,.0f} MB measured "
          f"{r['measured_peak_mb']:>8,.0f} MB ({r['plan_over_measured']:.2f})  tokens/s planned "
          f"{r['planned_tokens_per_s']:.1f} measured {r['measured_tokens_per_s']:.1f}  "
          f"seconds planned {r['planned_train_seconds_for_steps']:.1f} measured "
          f"{r['measured_step_seconds']:.1f}", flush=True)
    return r


def _machine() -> dict:
    import platform

    import torch

    flags = []
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = sorted({f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in text})
    except OSError:
        pass
    return {"cpu_flags": flags, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help=f"default: {DEFAULT_CASES}; --smoke: {SMOKE_CASES}")
    parser.add_argument("--steps", type=int, help="default 3; --smoke: 2")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--model", help="--smoke only: the tiny model folder to use")
    parser.add_argument("--out", help="default bench/results/plan-<device>.json")
    _smoke.add_flag(parser)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--build-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-case", help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return _build(args.build, args.build_out)
    args.steps = args.steps or (2 if args.smoke else 3)
    if args.child_case:
        return _child(args)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / f"plan-{device}.json")
    cases = args.cases or (SMOKE_CASES if args.smoke else DEFAULT_CASES)
    smoke_model = _smoke.smoke_model(args.model) if args.smoke else args.model
    rows, failed = [], []
    for case in cases.split(","):
        row = run_case(case.strip(), args, smoke_model)
        (rows.append(row) if row else failed.append(case))
    result = {"benchmark": "plan", "smoke": args.smoke, "device": device,
              "machine": _machine(), "steps": args.steps,
              "max_seq_length": args.max_seq_length, "batch_size": args.batch_size,
              "cases": rows, "failed": failed}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
