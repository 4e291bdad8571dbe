"""Generation benchmark: afinar's answers vs llama.cpp on the same model, batch 1 and batched.

    .venv/bin/python bench/bench_generate.py [--prompts 8] [--max-new-tokens 64]
        [--batched-prompts 36] [--batch-size 32] [--out bench/results/generate.json]
    .venv/bin/python bench/bench_generate.py --smoke --out PATH [--model DIR]   # still runs?

Model: the embedded SmolLM2-135M-Instruct. afinar generates with its own path
(`afinar.infer.generate`: fp32 weights, greedy, the model's stop tokens), the way `afinar chat`,
`afinar eval` and the server do. llama.cpp (llama-cpp-python, the `llama` extra) runs the same
model exported by afinar's own GGUF writer as f16, on the same threads.

- batch 1: each of `--prompts` held-out prompts of the bundled example answered alone, greedy,
  up to `--max-new-tokens`; both sides are timed from the prompt to the last token (prefill
  included) and report new tokens per second. Token agreement: how many answers are identical
  token for token (f16 weights against fp32 may pick a different token at a near-tie).
- batched: `--batched-prompts` prompts answered by afinar at `--batch-size` (what `afinar eval`
  does) against the same prompts one at a time (batch 1).

The numbers are for reading, never for test assertions. `--smoke`: a tiny random model (or
--model), 2 prompts alone and 3 at batch 2, 4 new tokens (bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import _smoke  # noqa: E402
from bench_eval import held_out_prompts  # noqa: E402

from afinar.export.convert import convert_model  # noqa: E402
from afinar.export.llama_runner import LlamaCpp  # noqa: E402
from afinar.export.merged import write_hf_folder  # noqa: E402
from afinar.infer.generate import GenerationSettings, load  # noqa: E402


def _afinar_batch1(loaded, prompts, max_new: int) -> tuple[float, list[list[int]]]:
    settings = GenerationSettings(max_new_tokens=max_new)
    answers, started = [], time.perf_counter()
    for prompt in prompts:
        batch = loaded._prompt_batch([prompt])
        with torch.inference_mode():
            out = loaded.model.generate(**batch, **loaded._generate_kwargs(settings))
        answers.append(out[0, batch["input_ids"].shape[1]:].tolist())
    return time.perf_counter() - started, [_until_stop(a, loaded.stop_ids) for a in answers]


def _until_stop(ids: list[int], stops) -> list[int]:
    for k, token in enumerate(ids):
        if token in stops:
            return ids[:k + 1]
    return ids


def _llama_batch1(llama, loaded, prompts, max_new: int) -> tuple[float, list[list[int]]]:
    answers, started = [], time.perf_counter()
    for prompt in prompts:
        answers.append(llama.greedy(loaded.prompt_ids(prompt), max_new))
    return time.perf_counter() - started, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="default 8; --smoke: 2")
    parser.add_argument("--max-new-tokens", type=int, help="default 64; --smoke: 4")
    parser.add_argument("--batched-prompts", type=int, help="default 36; --smoke: 3")
    parser.add_argument("--batch-size", type=int, help="default 32; --smoke: 2")
    parser.add_argument("--model", help="default smollm2-135m-instruct; --smoke: a tiny random "
                        "model")
    parser.add_argument("--out", help="default bench/results/generate.json")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "generate.json")
    for name, real, smoke in (("prompts", 8, 2), ("max_new_tokens", 64, 4),
                              ("batched_prompts", 36, 3), ("batch_size", 32, 2)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else real)
    model = _smoke.smoke_model(args.model) if args.smoke else args.model or "smollm2-135m-instruct"

    loaded = load(model, notify=lambda message: None)
    prompts = held_out_prompts(max(args.prompts, args.batched_prompts))
    loaded.generate(prompts[:1], GenerationSettings(max_new_tokens=4), 1)  # warm-up
    results: dict = {"threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        gguf = Path(tmp) / "model-f16.gguf"  # as `afinar export --to gguf` makes it
        write_hf_folder(loaded.model, loaded.tokenizer, loaded.stop_ids, Path(tmp) / "hf", "f32")
        convert_model(Path(tmp) / "hf", gguf, "f16", {}, notify=lambda message: None)
        with LlamaCpp(gguf, n_ctx=1024) as llama:
            llama.greedy(loaded.prompt_ids(prompts[0]), 4)  # warm-up
            few = prompts[:args.prompts]
            llama_s, llama_ids = _llama_batch1(llama, loaded, few, args.max_new_tokens)
            afinar_s, afinar_ids = _afinar_batch1(loaded, few, args.max_new_tokens)
    n_llama, n_afinar = sum(map(len, llama_ids)), sum(map(len, afinar_ids))
    results["batch1"] = {
        "prompts": len(few), "max_new_tokens": args.max_new_tokens,
        "afinar": {"seconds": round(afinar_s, 2), "new_tokens": n_afinar,
                   "new_tokens_per_s": round(n_afinar / afinar_s, 1), "weights": "fp32"},
        "llama_cpp": {"seconds": round(llama_s, 2), "new_tokens": n_llama,
                      "new_tokens_per_s": round(n_llama / llama_s, 1), "weights": "f16 GGUF"},
        "answers_identical_tokens": sum(a == b for a, b in zip(afinar_ids, llama_ids)),
    }
    results["batch1"]["ratio_afinar_over_llama_cpp"] = round(
        results["batch1"]["afinar"]["new_tokens_per_s"]
        / results["batch1"]["llama_cpp"]["new_tokens_per_s"], 3)

    many = prompts[:args.batched_prompts]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    rows, seconds = {}, {}
    for size in (1, args.batch_size):
        started = time.perf_counter()
        done = loaded.complete(many, settings, batch_size=size)
        seconds[size] = time.perf_counter() - started
        tokens = sum(c.completion_tokens for c in done)
        rows[f"batch{size}"] = {"seconds": round(seconds[size], 2), "new_tokens": tokens,
                                "new_tokens_per_s": round(tokens / seconds[size], 1),
                                "texts": [c.text for c in done]}
    one, big = rows["batch1"], rows[f"batch{args.batch_size}"]
    big["answers_identical_to_batch1"] = sum(a == b for a, b in zip(big["texts"], one["texts"]))
    for row in rows.values():
        row.pop("texts")
    results["batched"] = {"prompts": len(many), **rows, "speedup_over_batch1": round(
        seconds[1] / seconds[args.batch_size], 2)}  # unrounded: a smoke run takes milliseconds

    record = {"benchmark": "generate", "smoke": args.smoke, "model": model, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch": torch.__version__, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
