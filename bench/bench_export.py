"""Export benchmark: a trained run (the demo's, by default) exported to every GGUF type and as
merged weights, each verified; then decoding speed of llama.cpp on each GGUF next to the trained
model in transformers (what a user runs before exporting), on the same prompts in the same run.

    .venv/bin/python bench/bench_export.py RUN [--types f32,f16,bf16,q8_0,q4_k_m] [--prompts 8]

Per type it reports: export time (including verification), file size, greedy agreement with the
trained model (share of the first 32 tokens that agree, over the golden held-out prompts), how
many answers stopped by themselves, and greedy decode tokens/s as a ratio to transformers fp32.
Numbers are for reading, never for assertions; nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    parser.add_argument("run")
    parser.add_argument("--types", default="f32,f16,bf16,q8_0,q4_k_m")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="decode length for tokens/s")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "export.json"))
    args = parser.parse_args()

    from afinar.export import export
    from afinar.export.verify import VerificationFailed, golden_prompts

    prompts, _ = golden_prompts(Path(args.run), args.prompts)
    results = {"run": args.run, "prompts": len(prompts), "decode_tokens": args.tokens, "types": {}}
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
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
