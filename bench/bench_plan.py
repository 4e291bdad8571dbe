"""The memory plan against the measured peak, on real model shapes with random weights.

    .venv/bin/python bench/bench_plan.py [--cases smollm2-135m:lora,llama-3.2-1b:4bit,...]
                                         [--steps 2] [--max-seq-length 128]

Shapes: the embedded SmolLM2-135M-Instruct (its real weights), and Llama-3.2-1B and
Qwen2.5-3B built from their published configurations with random weights, saved once in bf16
(the dtype both are distributed in) under AFINAR_HOME/bench-shapes. Nothing is downloaded: the
embedded tokenizer is used (its ids are valid in the larger vocabularies).

Each case trains `--steps` LoRA steps on the bundled example with `afinar train`'s own code in a
child process of its own: the plan it prints (plan.json) and the peak it measures (run.json;
peak resident memory on a CPU, peak allocated memory on a GPU) are compared, with the planned
and measured tokens/s. Writes bench/results/plan-<device>.json. Numbers are for reading, never
for assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "soporte-triaje" / "data.jsonl"

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
DEFAULT_CASES = ("smollm2-135m:lora,smollm2-135m:4bit,llama-3.2-1b:lora,llama-3.2-1b:4bit,"
                 "qwen2.5-3b:lora,qwen2.5-3b:4bit")


def shape_folder(name: str) -> str:
    """The embedded model's name, or a folder with the shape's random bf16 weights."""
    if name == "smollm2-135m":
        return "smollm2-135m-instruct"
    from afinar.paths import afinar_home

    folder = afinar_home() / "bench-shapes" / name
    if not (folder / "config.json").is_file():
        # A process of its own: building the model must not count in a measured peak.
        subprocess.run([sys.executable, __file__, "--build", name, "--out", str(folder)],
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


def _child(model: str, mode: str, steps: int, max_len: int, batch: int, out: str) -> None:
    from afinar.config import load_train_config
    from afinar.train.loop import train

    sets = [f"max_steps={steps}", "evaluate=false", "held_out_fraction=0", "save_steps=1000",
            f"max_seq_length={max_len}", f"batch_size={batch}", "gradient_checkpointing=false"]
    if mode == "4bit":
        sets.append("quantization=4bit")
    config = load_train_config(None, sets, data=str(DATA), model=model, output=out)
    summary = train(config).summary
    plan = json.loads((Path(out) / "plan.json").read_text())
    print("RESULT " + json.dumps({
        "planned_peak_mb": plan["peak_memory_mb"], "measured_peak_mb": summary["peak_memory_mb"],
        "planned_parts_mb": plan["settings"]["memory_mb"],
        "planned_tokens_per_s": plan["time"]["tokens_per_s"],
        "measured_tokens_per_s": round(summary["tokens_per_s"], 2),
        "precision": summary["precision"], "quantization": summary["quantization"]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default=DEFAULT_CASES)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return _build(args.build, args.out)
    if args.child:
        return _child(args.child, args.mode, args.steps, args.max_seq_length, args.batch_size,
                      args.out)

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for case in args.cases.split(","):
        name, mode = case.split(":")
        model = shape_folder(name)
        with tempfile.TemporaryDirectory() as scratch:
            run = subprocess.run(
                [sys.executable, __file__, "--child", model, "--mode", mode, "--steps",
                 str(args.steps), "--max-seq-length", str(args.max_seq_length), "--batch-size",
                 str(args.batch_size), "--out", str(Path(scratch) / "run")],
                capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY":
                                                     "error"})
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode or not lines:
            print(f"{case}: failed\n{run.stderr[-2000:]}")
            continue
        result = {"case": case, **json.loads(lines[-1][7:])}
        result["plan_over_measured"] = round(result["planned_peak_mb"]
                                             / result["measured_peak_mb"], 3)
        rows.append(result)
        print(f"{case:24s} planned {result['planned_peak_mb']:>9,.0f} MB  measured "
              f"{result['measured_peak_mb']:>9,.0f} MB  ratio {result['plan_over_measured']:.2f}"
              f"  tokens/s planned {result['planned_tokens_per_s']:.1f} measured "
              f"{result['measured_tokens_per_s']:.1f}", flush=True)
    out = ROOT / "bench" / "results" / f"plan-{device}.json"
    out.write_text(json.dumps({"device": device, "steps": args.steps,
                               "max_seq_length": args.max_seq_length,
                               "batch_size": args.batch_size, "cases": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
