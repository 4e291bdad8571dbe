"""GGUF export on real ~1B shapes through llama.cpp's converter: wall time and peak memory.

    .venv/bin/python bench/bench_convert.py [--shapes llama-3.2-1b,qwen2.5-1.5b] [--steps 2]
    .venv/bin/python bench/bench_convert.py --afinar-src DIR --out PATH   # another afinar's export
    .venv/bin/python bench/bench_convert.py --shapes llama-3-1b --compare-src DIR   # side by side
    .venv/bin/python bench/bench_convert.py --smoke --out PATH [--model DIR]  # still runs?

For each shape: a model with the published config and random bf16 weights (built once into
AFINAR_HOME/bench-shapes/, as bench_plan.py does), trained a few QLoRA steps (4-bit, fp32
compute, short sequences: the weights are random, the steps only make a real QLoRA run
directory), then `afinar export RUN --to gguf --quant q4_k_m` in a process of its own, with
verification on 2 golden prompts. It reports the export's wall time, its process's peak RSS (the
children's is not reported: a child forked from a process holding the fp32 reference starts its
ru_maxrss at the parent's size, so RUSAGE_CHILDREN says nothing about the converter), the size,
what the verification measured and which llama.cpp converted the file. Verification runs in
full (prompt ids, tokenizer probes, teacher-forced agreement), but the agreement bar is 0: a
random model's logits are near-ties everywhere, so its q4 agreement measures nothing.
`--afinar-src DIR` runs the export with the afinar found in DIR/src (e.g. a worktree of the
commit before the converter, to measure the former home-made writer where it could run).
`--smoke`: the tiny random model (bench/_smoke.py), 2 QLoRA steps, one prompt.
"""

from __future__ import annotations

import argparse
import json
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
from bench_plan import SHAPES as PLAN_SHAPES  # noqa: E402

DATA = ROOT / "examples" / "soporte-triaje" / "data.jsonl"
SHAPES = {
    "llama-3.2-1b": PLAN_SHAPES["llama-3.2-1b"],  # Llama 3.1's architecture and RoPE scaling
    # Llama 3.0's architecture (no RoPE scaling) at the 1B size: the largest Llama-family shape
    # afinar's former home-made writer could convert, for the side-by-side (--compare-src).
    "llama-3-1b": {k: v for k, v in PLAN_SHAPES["llama-3.2-1b"].items()
                   if k not in ("rope_scaling", "rope_parameters")} | {
                       "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                       "max_position_embeddings": 8192},
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def _shape_folder(name: str) -> Path:
    from afinar.paths import afinar_home

    folder = afinar_home() / "bench-shapes" / name
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--build", name, "--build-out", str(folder)],
                       check=True)
    return folder


def _build(name: str, out: Path) -> None:
    """Random bf16 weights of the shape, with the embedded model's tokenizer (one llama.cpp
    knows), saved atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from afinar.models.load import load_tokenizer
    from afinar.models.registry import resolve_model

    values = dict(SHAPES[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    model.save_pretrained(tmp)
    load_tokenizer(resolve_model("smollm2-135m-instruct", notify=print).weights
                   ).save_pretrained(tmp)
    tmp.rename(out)


def _train(model: str, output: Path, steps: int) -> tuple[Path, float]:
    from afinar.config import load_train_config
    from afinar.train.recipe import train

    sets = [f"max_steps={steps}", "evaluate=false", "quantization=4bit", "precision=fp32",
            "compile=false", "max_seq_length=64", "batch_size=1",
            "gradient_checkpointing=false", "preserve=false"]
    config = load_train_config(None, sets, data=str(DATA), model=model, output=str(output))
    started = time.perf_counter()
    result = train(config, on_event=lambda event: None)
    return Path(result.run_dir), time.perf_counter() - started


def _export_child(args) -> None:
    """Runs in its own process: the export, and what this process and its children peaked at."""
    import afinar
    from afinar.errors import AfinarError
    from afinar.export import export
    from afinar.export.verify import VerificationFailed

    started = time.perf_counter()
    out: dict = {"afinar": str(Path(afinar.__file__).parent)}
    try:
        result = export(args.child_run, to="gguf", quant=args.kind, output=args.child_out,
                        prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                        min_agreement=0.0, notify=lambda message: None)
        summary = result.verification.summary()
        provenance = Path(result.output) / "afinar.json"
        out.update({
            "files_bytes": result.files,
            "verification": {k: summary.get(k) for k in (
                "passed", "prompts", "same_prompt_ids", "tokenizer_probes_mismatched",
                "teacher_forced_agreement", "greedy_agreement")},
            "converted_by": json.loads(provenance.read_text()).get("converted_by")
            if provenance.is_file() else None})
    except VerificationFailed as exc:
        out["verification_failed"] = exc.report.summary()
    except AfinarError as exc:  # the former writer refused some shapes: that is a result
        out["refused"] = exc.message
    out["export_seconds"] = round(time.perf_counter() - started, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(out))


def _measure_export(run: Path, kind: str, prompts: int, max_new_tokens: int,
                    afinar_src: str | None) -> dict:
    env = dict(os.environ)
    if afinar_src:
        env["PYTHONPATH"] = str(Path(afinar_src) / "src")
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as scratch:
        command = [sys.executable, __file__, "--child-run", str(run), "--child-out",
                   str(Path(scratch) / "export"), "--kind", kind, "--prompts", str(prompts),
                   "--max-new-tokens", str(max_new_tokens)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the export child failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "process_seconds": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--kind", default="q4_k_m")
    parser.add_argument("--steps", type=int, default=2, help="QLoRA steps before the export")
    parser.add_argument("--prompts", type=int, help="golden prompts verified (default 2)")
    parser.add_argument("--max-new-tokens", type=int, help="default 16; --smoke: 4")
    parser.add_argument("--afinar-src", help="export with the afinar in DIR/src")
    parser.add_argument("--compare-src", help="also export the same run with the afinar in "
                        "DIR/src (e.g. a worktree of the former writer): `compared` per shape")
    parser.add_argument("--model", help="--smoke: the model to train (else the tiny one)")
    parser.add_argument("--out", help="default bench/results/convert.json")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--build-out", help=argparse.SUPPRESS)
    parser.add_argument("--child-run", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    _smoke.add_flag(parser)
    args = parser.parse_args()
    if args.build:
        return _build(args.build, Path(args.build_out))
    args.prompts = args.prompts or (1 if args.smoke else 2)
    args.max_new_tokens = args.max_new_tokens or (4 if args.smoke else 16)
    if args.child_run:
        return _export_child(args)
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "convert.json")

    import torch

    models = ({"tiny": _smoke.smoke_model(args.model)} if args.smoke else
              {name: str(_shape_folder(name)) for name in args.shapes.split(",")})
    results = {"benchmark": "convert", "smoke": args.smoke, "kind": args.kind,
               "steps": args.steps, "prompts": args.prompts,
               "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
               "afinar_src": args.afinar_src or str(ROOT), "shapes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-convert-runs-") as scratch:
        for name, model in models.items():
            print(f"{name}: {args.steps} QLoRA steps", flush=True)
            run, train_seconds = _train(model, Path(scratch) / name, args.steps)
            print(f"{name}: exporting to {args.kind}", flush=True)
            measured = _measure_export(run, args.kind, args.prompts, args.max_new_tokens,
                                       args.afinar_src)
            results["shapes"][name] = {"model": model, "train_seconds": round(train_seconds, 1),
                                       **measured}
            if args.compare_src:
                print(f"{name}: exporting to {args.kind} with {args.compare_src}", flush=True)
                results["compare_src"] = args.compare_src
                results["shapes"][name]["compared"] = _measure_export(
                    run, args.kind, args.prompts, args.max_new_tokens, args.compare_src)
            print(json.dumps(results["shapes"][name], indent=2), flush=True)
            # After every shape: a long run stopped part-way keeps what it measured.
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
