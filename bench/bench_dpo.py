"""DPO benchmark: afinar's DPO objective vs TRL's DPOTrainer, same model, data and settings.

    .venv/bin/python bench/bench_dpo.py [--steps 36] [--compile off|on] [--precision auto|fp32|bf16]
        [--out bench/results/dpo.json]
    .venv/bin/python bench/bench_dpo.py --smoke --out PATH [--model DIR]   # does it still run?

Needs the `dev` or `bench` extra (trl==1.16.0, datasets==5.2.0) and the embedded
SmolLM2-135M-Instruct (converted once by any `afinar` command).

Both sides: the bundled examples/respuestas-breves/data.jsonl (72 pairs, OpenAI DPO format),
every pair trained on (no held-out split), LoRA r=16, alpha=32, dropout 0, all-linear; 4 pairs
per step (8 sequences); beta 0.1, sigmoid loss; lr 1e-4, cosine with 10% warmup; grad-norm clip
1.0; max length 512; seed 42; the same precision. Each side in its own subprocess, so peak RSS
(ru_maxrss) is per side.

What is timed, on both sides: steady state, from the end of optimizer step 1 to the end of the
last one. TRL runs the reference model (the adapter disabled) inside every step; afinar runs it
once, before training, over the whole file: that pass is timed apart and its cost is charged to
the timed steps in proportion to their share of the run's steps (`reference_charged_s`). The
default 36 steps of 4 pairs are two epochs of the 72 pairs (`epochs: auto` gives this file 4):
TRL computes each pair's reference twice, afinar once.
Tokens are non-padding tokens of both sides of every pair trained on.

For reading, never for test assertions: see bench/README.md. `--smoke`: both sides on a tiny
random model (or --model), 2 steps (bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _smoke  # noqa: E402
from bench_train import (DEFAULT_MODEL, LORA, MAX_GRAD_NORM, ROOT, SEED,  # noqa: E402
                         WARMUP_RATIO, _loadavg, _maxrss_mb, _resolved_precision, _run_child,
                         _warmup_steps,
                         _set_threads)

DATA = ROOT / "examples" / "respuestas-breves" / "data.jsonl"
PAIRS_PER_STEP = 4
LEARNING_RATE = 1e-4
BETA = 0.1
MAX_LENGTH = 512


def child_afinar(args) -> dict:
    _set_threads(args.threads)
    import afinar.train.objectives as objectives
    from afinar.config import LoraSettings, TrainConfig
    from afinar.train.recipe import train

    # Instrumentation only: real tokens of every training batch (after the reference pass).
    batches: list[int] = []
    started = {"training": False}
    original = objectives.collate

    def counting_collate(items, pad_id):
        batch = original(items, pad_id)
        if started["training"]:
            batches.append(int(batch["attention_mask"].sum()))
        return batch

    objectives.collate = counting_collate
    marks: dict = {}
    losses: list[float] = []

    def on_event(event):
        if event["type"] == "start":
            started["training"] = True
            marks["train_pairs"] = event["train_examples"]
        elif event["type"] == "step":
            losses.append(event["train_loss"])
        elif event["type"] == "log" and "reference log-probs" in event["message"]:
            marks["reference_message"] = event["message"]

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        config = TrainConfig(
            data=str(args.data), model=str(args.model), output=str(Path(tmp) / "run"),
            objective="dpo", dpo={"beta": BETA, "sft_weight": 0.0},  # TRL's sigmoid loss alone
            held_out_fraction=0.0, method="lora",
            lora=LoraSettings(**LORA), epochs=args.steps, max_steps=args.steps,
            learning_rate=LEARNING_RATE, batch_size=PAIRS_PER_STEP, warmup_ratio=WARMUP_RATIO,
            lr_scheduler="cosine", max_grad_norm=MAX_GRAD_NORM, max_seq_length=MAX_LENGTH,
            seed=SEED, eval_steps=args.steps + 1, save_steps=args.steps + 1,
            early_stopping_patience=None, precision=args.precision, evaluate=False,
            compile={"on": True, "off": False, "auto": "auto"}[args.compile])
        result = train(config, on_event=on_event)
        records = [json.loads(line) for line in
                   (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        reference = json.loads((result.run_dir / "reference_logps.json").read_text())
    train_records = [r for r in records if r["type"] == "train"]
    steps_seconds = train_records[-1]["elapsed_s"] - train_records[0]["elapsed_s"]
    timed_steps = len(train_records) - 1
    # The pass is one cost for the whole run: the timed steps carry their share of the run's steps.
    charged = reference["seconds"] * timed_steps / len(train_records)
    tokens = sum(batches[1:len(train_records)])
    return {"side": "afinar", "steps": len(train_records), "steps_seconds": steps_seconds,
            "reference_seconds": reference["seconds"], "reference_charged_s": charged,
            "timed_seconds": steps_seconds + charged, "tokens": tokens,
            "tokens_per_s": tokens / (steps_seconds + charged),
            "first_step_seconds": train_records[0]["elapsed_s"],
            "peak_rss_mb": _maxrss_mb(), "step_losses": losses,
            "final_reward_margin": train_records[-1]["train_reward_margin"],
            "final_accuracy": train_records[-1]["train_preference_accuracy"], **marks}


def child_trl(args) -> dict:
    _set_threads(args.threads)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = []
    for line in args.data.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        rows.append({"prompt": record["input"]["messages"],
                     "chosen": record["preferred_output"],
                     "rejected": record["non_preferred_output"]})
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    precision = _resolved_precision(args.precision)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], bias="none",
                             task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory(prefix="bench-trl-dpo-") as tmp:
        config = DPOConfig(
            output_dir=tmp, use_cpu=True, bf16=precision == "bf16", fp16=False,
            per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=LEARNING_RATE, lr_scheduler_type="cosine",
            warmup_steps=_warmup_steps(args.steps), max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0,
            beta=BETA, loss_type=["sigmoid"], max_length=MAX_LENGTH, seed=SEED,
            report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1,
            dataloader_num_workers=0, gradient_checkpointing=False)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config)
        batches: list[int] = []
        collator = trainer.data_collator

        def counting(features):
            batch = collator(features)
            batches.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.data_collator = counting
        ends: list[float] = []
        losses: list[float] = []

        class Clock(TrainerCallback):
            def on_step_end(self, *a, **k):
                ends.append(time.perf_counter())

            def on_log(self, _args, _state, _control, logs=None, **k):
                if logs and "loss" in logs:
                    losses.append(logs["loss"])

        trainer.add_callback(Clock())
        started = time.perf_counter()
        trainer.train()
        margins = trainer.state.log_history[-2].get("rewards/margins") if len(
            trainer.state.log_history) > 1 else None
    steps_seconds = ends[-1] - ends[0]
    tokens = sum(batches[1:len(ends)])
    return {"side": "trl", "steps": len(ends), "steps_seconds": steps_seconds,
            "timed_seconds": steps_seconds, "tokens": tokens,
            "tokens_per_s": tokens / steps_seconds, "first_step_seconds": ends[0] - started,
            "peak_rss_mb": _maxrss_mb(), "step_losses": losses,
            "final_reward_margin": margins}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="default 36; --smoke: 2")
    parser.add_argument("--out", type=Path, help="default bench/results/dpo.json")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model", type=Path, help=f"default {DEFAULT_MODEL}; --smoke: a tiny "
                        "random model")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--compile", choices=["on", "off", "auto"], default="off",
                        help="afinar's compile setting (default off: the reference pass then "
                        "holds no compile time)")
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["afinar", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    _smoke.add_flag(parser)
    args = parser.parse_args(argv)
    if args.child:
        result = (child_afinar if args.child == "afinar" else child_trl)(args)
        args.child_out.write_text(json.dumps(result))
        return 0
    args.out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "dpo.json")
    args.steps = args.steps or (2 if args.smoke else 36)
    args.model = Path(_smoke.smoke_model(args.model) if args.smoke
                      else args.model or DEFAULT_MODEL)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no converted model; run any `afinar` command once "
                         "or pass --model")
    import torch

    threads = args.threads or torch.get_num_threads()
    load = _loadavg()
    a = _run_child("afinar", args, threads, script=Path(__file__))
    b = _run_child("trl", args, threads, script=Path(__file__))
    ratios = {"tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
              "peak_rss_mb": a["peak_rss_mb"] / b["peak_rss_mb"]}
    print(f"{'':26}{'afinar':>12}{'TRL':>12}")
    for label, key, fmt in (("timed steps", "steps", "{}"), ("steps (s)", "steps_seconds",
                            "{:.1f}"), ("reference charged (s)", "reference_charged_s", "{:.1f}"),
                            ("tokens", "tokens", "{}"), ("tokens/s", "tokens_per_s", "{:.1f}"),
                            ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
                            ("first step (s)", "first_step_seconds", "{:.1f}")):
        cells = ["-" if side.get(key) is None else fmt.format(side[key]) for side in (a, b)]
        print(f"{label:26}{cells[0]:>12}{cells[1]:>12}")
    print(f"\ntokens/s afinar/TRL: {ratios['tokens_per_s']:.2f}x; peak RSS afinar/TRL: "
          f"{ratios['peak_rss_mb']:.2f}x")
    out = {"smoke": args.smoke, "settings": {"steps": args.steps, "pairs_per_step": PAIRS_PER_STEP, "lora": LORA,
                        "beta": BETA, "learning_rate": LEARNING_RATE, "max_length": MAX_LENGTH,
                        "precision": _resolved_precision(args.precision), "threads": threads,
                        "afinar_compile": args.compile, "data": str(args.data.relative_to(ROOT))},
           "loadavg_before": load, "afinar": a, "trl": b, "ratios": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
