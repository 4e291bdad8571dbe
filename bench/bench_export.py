"""Export benchmark: a trained run (the demo's, by default) exported to every GGUF type and as
merged weights, each verified; then decoding speed of llama.cpp on each GGUF next to the trained
model in transformers (what a user runs before exporting), on the same prompts in the same run.

    .venv/bin/python bench/bench_export.py RUN [--types f32,f16,bf16,q8_0,q4_k_m] [--prompts 8]
    .venv/bin/python bench/bench_export.py --smoke --out PATH [RUN] [--model DIR]  # still runs?

Per type it reports: export time (including verification), file size, greedy agreement with the
trained model (share of the first 32 tokens that agree, over the golden held-out prompts), how
many answers stopped by themselves, and greedy decode tokens/s as a ratio to transformers fp32.
Numbers are for reading, never for assertions; nothing else should run meanwhile. `--smoke`:
f16 and q8_0, 2 prompts, 4 tokens, from RUN or else a run trained for two steps on a tiny random
model (or --model) (bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402


def _decode_speed_transformers(run: str, prompts, tokens: int) -> float:
    import torch

    from afinar import load

    model = load(run, notify=lambda m: None)
    total, seconds = 0, 0.0
    for prompt in prompts:
        ids = torch.tensor([model.prompt_ids(prompt)])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=tokens, min_new_tokens=tokens,
                                       pad_token_id=model.tokenizer.pad_token_id)
        seconds += time.perf_counter() - start
        total += out.shape[1] - ids.shape[1]
    return total / seconds


def _decode_speed_llama(path: Path, run: str, prompts, tokens: int) -> float:
    from afinar import load
    from afinar.export.llama_runner import LlamaCpp

    encoder = load(run, notify=lambda m: None)
    total, seconds = 0, 0.0
    with LlamaCpp(path) as llm:
        for prompt in prompts:
            ids = encoder.prompt_ids(prompt)
            llm.llm.reset()
            start = time.perf_counter()
            count = 0
            for _ in llm.llm.generate(ids, temp=0.0, top_k=1):  # never stops on EOS: fixed length
                count += 1
                if count >= tokens:
                    break
            seconds += time.perf_counter() - start
            total += count
    return total / seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", help="a trained run (--smoke: optional)")
    parser.add_argument("--types", help="default f32,f16,bf16,q8_0,q4_k_m; --smoke: f16,q8_0")
    parser.add_argument("--prompts", type=int, help="default 8; --smoke: 2")
    parser.add_argument("--tokens", type=int, help="decode length for tokens/s (default 64; "
                        "--smoke: 4)")
    parser.add_argument("--model", help="--smoke without RUN: the model its run trains")
    parser.add_argument("--out", help="default bench/results/export.json")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "export.json")
    smoke = args.smoke
    if not args.run and not smoke:
        parser.error("RUN is required")
    args.run = args.run or _smoke.smoke_run(args.model)
    args.types = args.types or ("f16,q8_0" if smoke else "f32,f16,bf16,q8_0,q4_k_m")
    args.prompts = args.prompts or (2 if smoke else 8)
    args.tokens = args.tokens or (4 if smoke else 64)

    from afinar.export import export
    from afinar.export.verify import VerificationFailed, golden_prompts

    prompts, _ = golden_prompts(Path(args.run), args.prompts)
    results = {"smoke": smoke, "run": args.run, "prompts": len(prompts), "decode_tokens": args.tokens, "types": {}}
    base_speed = _decode_speed_transformers(args.run, prompts[:4], args.tokens)
    results["transformers_fp32_tokens_per_s"] = round(base_speed, 1)
    print(f"transformers fp32 greedy decode: {base_speed:.1f} tokens/s")
    with tempfile.TemporaryDirectory() as scratch:
        merged = export(args.run, to="merged", output=f"{scratch}/merged", prompts=args.prompts,
                        notify=lambda m: None)
        results["types"]["merged-f32"] = {
            "seconds": round(merged.seconds, 1),
            "bytes": sum(merged.files.values()),
            **merged.verification.summary()}
        print("merged f32", results["types"]["merged-f32"])
        for kind in args.types.split(","):
            result = export(args.run, to="gguf", quant=kind, output=f"{scratch}/{kind}",
                            prompts=args.prompts, min_agreement=0.0, notify=lambda m: None)
            vs_fp32 = result.verification.summary()
            if kind in ("f16", "bf16"):  # verified against rounded weights; also vs fp32
                try:
                    vs_fp32 = export(args.run, to="gguf", quant=kind, prompts=args.prompts,
                                     output=f"{scratch}/{kind}-fp32ref", notify=lambda m: None,
                                     round_reference=False).verification.summary()
                except VerificationFailed as failed:
                    vs_fp32 = failed.report.summary()
            gguf_file = next(result.output.glob("*.gguf"))
            speed = _decode_speed_llama(gguf_file, args.run, prompts[:4], args.tokens)
            row = {"seconds": round(result.seconds, 1), "bytes": gguf_file.stat().st_size,
                   "decode_tokens_per_s": round(speed, 1),
                   "decode_speed_vs_transformers": round(speed / base_speed, 2),
                   **result.verification.summary()}
            if kind in ("f16", "bf16"):
                row["vs_unrounded_fp32"] = {k: vs_fp32[k] for k in (
                    "greedy_agreement", "exact_first_tokens", "identical_answers")}
            results["types"][kind] = row
            print(kind, row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    main()
