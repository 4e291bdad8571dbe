"""Evaluation-generation benchmark: afinar's batched greedy answers vs the one-prompt-at-a-time
`model.generate` loop that fine-tuning guides show for checking a model on held-out prompts.

    .venv/bin/python bench/bench_eval.py [--prompts 36] [--max-new-tokens 96] [--batch-sizes 8 32]
    .venv/bin/python bench/bench_eval.py --smoke --out PATH [--model DIR]   # does it still run?

Both sides: the embedded SmolLM2-135M-Instruct (fp32, CPU), the held-out prompts of the bundled
example (the seeded split `afinar train` uses), greedy decoding, the same answer budget, the same
stop tokens (<|im_end|> and the model's EOS). Timed region: generation only (model loaded and
warmed up with one short generation first). The numbers are for reading, never for assertions.
`--smoke`: a tiny random model (or --model), 3 prompts, 4 new tokens, batch 2 (bench/_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from afinar.config import load_train_config
from afinar.data.split import split_examples
from afinar.data.validate import load_examples
from afinar.infer.generate import GenerationSettings, load

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

EXAMPLE = ROOT / "examples" / "soporte-triaje"


def held_out_prompts(limit: int) -> list[list[dict]]:
    config = load_train_config(EXAMPLE / "train.yaml")
    _, held = split_examples(load_examples(config.data).examples, config.held_out_fraction,
                             config.seed)
    return [[{"role": m.role, "content": m.content} for m in ex.prompt_messages()]
            for ex in held][:limit]


@torch.inference_mode()
def guide_loop(loaded, prompts, max_new_tokens: int) -> list[str]:
    """What the guides do: apply_chat_template, generate, decode; one prompt at a time."""
    tok, model = loaded.tokenizer, loaded.model
    answers = []
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=loaded.stop_ids, pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(out[0, ids["input_ids"].shape[1]:],
                                  skip_special_tokens=True).strip())
    return answers


def new_tokens(loaded, answers: list[str]) -> int:
    return sum(len(loaded.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, help="default 36; --smoke: 3")
    parser.add_argument("--max-new-tokens", type=int, help="default 96; --smoke: 4")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 8 32; --smoke: 2")
    parser.add_argument("--model", help="default smollm2-135m-instruct; --smoke: a tiny random "
                        "model")
    parser.add_argument("--out", help="default bench/results/eval.json")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "eval.json")
    smoke = args.smoke
    args.prompts = args.prompts or (3 if smoke else 36)
    args.max_new_tokens = args.max_new_tokens or (4 if smoke else 96)
    args.batch_sizes = args.batch_sizes or ([2] if smoke else [8, 32])
    model = _smoke.smoke_model(args.model) if smoke else args.model or "smollm2-135m-instruct"

    loaded = load(model, notify=lambda message: None)
    prompts = held_out_prompts(args.prompts)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    loaded.generate(prompts[:2], GenerationSettings(max_new_tokens=4), 2)  # warm-up

    results, seconds = {}, {}
    start = time.perf_counter()
    reference = guide_loop(loaded, prompts, args.max_new_tokens)
    seconds["guide_loop_batch1"] = time.perf_counter() - start
    results["guide_loop_batch1"] = {"new_tokens": new_tokens(loaded, reference)}
    for size in args.batch_sizes:
        start = time.perf_counter()
        answers = loaded.generate(prompts, settings, batch_size=size)
        seconds[f"afinar_batch{size}"] = time.perf_counter() - start
        results[f"afinar_batch{size}"] = {
            "new_tokens": new_tokens(loaded, answers),
            # Left padding changes float rounding a little, so a few greedy answers may differ.
            "answers_identical_to_guide_loop": sum(a == b for a, b in zip(answers, reference))}
    for name, row in results.items():  # rates from unrounded times: a smoke run takes ~10 ms
        row["seconds"] = round(seconds[name], 2)
        row["new_tokens_per_s"] = round(row["new_tokens"] / seconds[name], 1)
        row["speedup_vs_guide_loop"] = round(seconds["guide_loop_batch1"] / seconds[name], 2)
    record = {"smoke": smoke, "model": model, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "threads": torch.get_num_threads(), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__, "results": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
