"""What turning off llama.cpp's repacked weights costs (afinar's fix for the AMX crash).

    .venv/bin/python bench/bench_llama_repack.py RUN [--types f16,q8_0,q4_0,q4_k_m] [--repeats 3]
    .venv/bin/python bench/bench_llama_repack.py --smoke --out PATH [RUN] [--model DIR]

RUN is a trained run (the demo's, say). Each type is exported without verification, then every
(type, repack on/off) pair is measured in a child process of its own, alternating on and off
`--repeats` times (the median is kept): prompt processing tokens/s on a ~200-token prompt and
batch-1 greedy decode tokens/s over 64 tokens. A child that crashes (repack on, on an AMX CPU)
is reported as crashed with its signal, which is the defect the setting avoids. Prints the CPU's
AMX/AVX512 flags; writes bench/results/llama_repack-<cpu kind>.json. Numbers are for reading,
never for assertions; nothing else should run meanwhile. `--smoke` (does it still run?): f16
only, once each way, 4 tokens, from RUN or else a run trained for two steps on a tiny random
model (or --model) (bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

PROMPT = ("<|im_start|>system\nEres un asistente de soporte.<|im_end|>\n<|im_start|>user\n"
          + "El pedido llegó con la caja abierta y falta una pieza del montaje. " * 12
          + "<|im_end|>\n<|im_start|>assistant\n")


def _measure(path: str, repack: bool, tokens: int) -> dict:
    """Runs in the child: one load, one prompt pass, one fixed-length greedy decode."""
    from afinar.export.llama_runner import LlamaCpp

    with LlamaCpp(path, repack=repack) as llm:
        ids = llm.tokenize(PROMPT)
        llm.llm.reset()
        start = time.perf_counter()
        llm.llm.eval(ids)
        prefill = len(ids) / (time.perf_counter() - start)
        llm.llm.reset()
        count, start = 0, None
        for _ in llm.llm.generate(ids, temp=0.0, top_k=1):  # never stops on EOS: fixed length
            if start is None:  # the first token includes the prompt pass: not decode speed
                start = time.perf_counter()
                continue
            count += 1
            if count >= tokens:
                break
        return {"prompt_tokens": len(ids), "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": count / (time.perf_counter() - start)}


def _child(path: Path, repack: bool, tokens: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", str(path), "--repack",
                           "on" if repack else "off", "--tokens", str(tokens)],
                          capture_output=True, text=True)
    if done.returncode < 0:
        return {"crashed": f"signal {-done.returncode}"}
    if done.returncode:
        return {"failed": done.stderr[-500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu() -> dict:
    from afinar.export.llama_runner import cpu_flags, use_repacked_weights

    flags = cpu_flags()
    model = next((line.partition(":")[2].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), "?")
    return {"model": model, "flags": sorted(flags & {"amx_tile", "amx_int8", "amx_bf16",
                                                     "avx512f", "avx512_bf16", "avx2"}),
            "afinar_default_repack": use_repacked_weights()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", help="a trained run (--smoke: optional)")
    parser.add_argument("--types", help="default f16,q8_0,q4_0,q4_k_m; --smoke: f16")
    parser.add_argument("--repeats", type=int, help="default 3; --smoke: 1")
    parser.add_argument("--tokens", type=int, help="default 64; --smoke: 4")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--repack", choices=["on", "off"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help="--smoke without RUN: the model its run trains")
    parser.add_argument("--out", help="default bench/results/llama_repack-<cpu kind>.json")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(_measure(args.measure, args.repack == "on", args.tokens)))
        return
    out_file = _smoke.out_path(parser, args, None)
    if not args.run and not args.smoke:
        parser.error("RUN is required")
    args.run = args.run or _smoke.smoke_run(args.model)
    args.types = args.types or ("f16" if args.smoke else "f16,q8_0,q4_0,q4_k_m")
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.tokens = args.tokens or (4 if args.smoke else 64)

    from afinar.export import export

    cpu = _cpu()
    kind = "amx" if "amx_tile" in cpu["flags"] else \
        "avx512bf16" if "avx512_bf16" in cpu["flags"] else "no-bf16"
    print(f"CPU: {cpu['model']} flags {' '.join(cpu['flags'])}; afinar's default: repacked "
          f"weights {'on' if cpu['afinar_default_repack'] else 'off'}")
    results = {"smoke": args.smoke, "run": args.run, "cpu": cpu, "decode_tokens": args.tokens, "types": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for quant in args.types.split(","):
            out = export(args.run, to="gguf", quant=quant, output=f"{scratch}/{quant}",
                         verify=False, notify=lambda m: None)
            path = next(out.output.glob("*.gguf"))
            runs: dict[str, list[dict]] = {"on": [], "off": []}
            for _ in range(args.repeats):
                for repack in ("on", "off"):
                    runs[repack].append(_child(path, repack == "on", args.tokens))
            row = {}
            for repack, got in runs.items():
                ok = [r for r in got if "decode_tokens_per_s" in r]
                if len(ok) < len(got):
                    row[f"repack_{repack}"] = next(r for r in got if r not in ok)
                    continue
                row[f"repack_{repack}"] = {
                    k: round(statistics.median(r[k] for r in ok), 1)
                    for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
            on, off = row.get("repack_on", {}), row.get("repack_off", {})
            if "decode_tokens_per_s" in on and "decode_tokens_per_s" in off:
                row["off_vs_on_decode"] = round(off["decode_tokens_per_s"]
                                                / on["decode_tokens_per_s"], 2)
                row["off_vs_on_prefill"] = round(off["prefill_tokens_per_s"]
                                                 / on["prefill_tokens_per_s"], 2)
            results["types"][quant] = row
            print(quant, json.dumps(row))
    out_file = out_file or ROOT / "bench" / "results" / f"llama_repack-{kind}.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written {out_file}")


if __name__ == "__main__":
    main()
