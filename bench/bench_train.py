"""Training benchmark: afinar's loop vs TRL's SFTTrainer on the same data, model and settings.

    .venv/bin/python bench/bench_train.py [--steps 12] [--precision auto|fp32|bf16]
        [--compile on|off|auto] [--out bench/results/train.json]
    .venv/bin/python bench/bench_train.py --smoke --out PATH [--model DIR]   # does it still run?

Needs the `bench` extra (trl==1.16.0, datasets==5.2.0) and the embedded SmolLM2-135M-Instruct
(converted once by any `afinar` command, into ~/.cache/afinar/models/smollm2-135m-instruct).

Both sides: LoRA r=16, alpha=32, dropout 0, all-linear; batch 4; lr 1e-3, cosine schedule with
10% warmup; grad-norm clip 1.0; no weight decay; the same precision on CPU (fp32, or bf16 autocast
over fp32 master weights; auto: what afinar measures faster for this model, and TRL then
trains in the same);
seed 42; same number of optimizer steps; the same 135 examples with loss on assistant tokens only (incl. <|im_end|>); max length 512;
no evaluation and no checkpointing in the timed steps (afinar: see README for its final save).

Each side runs in its own subprocess (run order: afinar, then TRL), so peak RSS
(getrusage(RUSAGE_SELF).ru_maxrss, in the child) is measured per side. Timed region: steady
state, from the end of optimizer step 1 to the end of the last step, on both sides (step 1 holds
warm-ups, and afinar's compile of its decoder layers, reported apart as `first_step_seconds`).
Tokens are non-padding tokens (attention_mask sum) of the batches actually trained on.

Before the two sides, the parent measures the machine's matmul peak (GFLOP/s, fp32 and bf16, on
the model's own shapes) and each side's share of it: 4 FLOPs per frozen linear weight per token
(forward and input gradient; LoRA, attention and the head are not counted, so the share is a
lower bound).

The numbers are for reading, never for test assertions: a 2-core machine shared with other jobs
is noisy; see bench/README.md. `--smoke`: the same two sides on a tiny random model (or --model),
2 steps, compile off, a shorter matmul probe (bench/_smoke.py); the tests run it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

DEFAULT_MODEL = Path.home() / ".cache" / "afinar" / "models" / "smollm2-135m-instruct"
DEFAULT_DATA = ROOT / "examples" / "soporte-triaje" / "data.jsonl"

# The shared training settings (the soporte-triaje example's, minus its held-out evaluation).
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
BATCH_SIZE = 4
LEARNING_RATE = 1e-3
WARMUP_RATIO = 0.1
MAX_LENGTH = 512
SEED = 42
MAX_GRAD_NORM = 1.0

# SmolLM2-Instruct's chat template with `{% generation %}` markers around each assistant answer
# and its <|im_end|> (not the "\n" after it, which is never generated). It renders exactly the same
# text as the shipped template (checked at run time); TRL needs the markers for
# assistant_only_loss and has no built-in training template for SmolLM2.
SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- helpers used by both children ---------------------------------------------------------------

def _resolved_precision(requested: str, device: str = "cpu") -> str:
    from afinar.models.load import pick_precision

    import torch

    return pick_precision(requested, torch.device(device))


def _device_peak_mb(device: str) -> float | None:
    """Peak memory allocated on a GPU (what limits a GPU run); None on a CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def matmul_peak(model_dir: Path, threads: int, device: str = "cpu", seconds: float = 0.5) -> dict:
    """GFLOP/s of the model's own matmul shapes (800 rows: a batch of 4 x 200 tokens), fp32 and
    bf16, on `threads` threads, `seconds` per shape: the best the machine does for this model's
    arithmetic."""
    import torch

    torch.set_num_threads(threads)
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    shapes = [(800, hidden, inter), (800, inter, hidden), (800, hidden, hidden)]
    out = {}
    kinds = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if device.startswith("cuda"):
        kinds.append(("fp16", torch.float16))
    for name, dtype in kinds:
        best = []
        for m, k, n in shapes:
            a = torch.randn(m, k, dtype=dtype, device=device)
            b = torch.randn(k, n, dtype=dtype, device=device)
            for _ in range(3):
                a @ b
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            sync()
            reps, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                a @ b
                reps += 1
            sync()
            best.append(2 * m * k * n * reps / (time.perf_counter() - started) / 1e9)
        out[name] = round(sum(best) / len(best), 1)
    return out


def frozen_linear_params(model_dir: Path) -> int:
    """Weights of the decoder layers' linear maps (what every token multiplies)."""
    config = json.loads((model_dir / "config.json").read_text())
    h, i = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads",
                                                         config["num_attention_heads"])
    head_dim = config.get("head_dim", h // heads)
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    return config["num_hidden_layers"] * (attn + 3 * h * i)


def _rss_mb() -> float:
    """Current resident set size (VmRSS), MB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _warmup_steps(steps: int) -> int:
    return int(round(WARMUP_RATIO * steps))  # as afinar computes it


def _read_messages(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                rows.append({"messages": [{"role": m["role"], "content": m["content"]}
                                          for m in record["messages"]]})
    return rows


# --- child: afinar -------------------------------------------------------------------------------

def _side_result(side: str, steps: int, steps_seconds: float, trained: list, peak: float,
                 step_losses: list, wall: float) -> dict:
    """The fields both sides report; `trained` holds (real, padded, width) per timed batch."""
    tokens = sum(b[0] for b in trained)
    padded = sum(b[1] for b in trained)
    return {
        "side": side,
        "steps": steps,
        "steps_seconds": steps_seconds,
        "tokens": tokens,
        "padded_tokens": padded,
        "max_batch_width": max(b[2] for b in trained),
        "batches_real_padded_width": trained,
        "tokens_per_s": tokens / steps_seconds,
        "padded_tokens_per_s": padded / steps_seconds,
        "peak_rss_mb": peak,
        "final_train_loss": step_losses[-1] if step_losses else None,
        "mean_train_loss": sum(step_losses) / len(step_losses) if step_losses else None,
        "step_losses": step_losses,
        "process_wall_s_train_call": wall,
    }


def child_afinar(args) -> dict:
    _set_threads(args.threads)
    import torch

    from afinar.train import recipe
    from afinar.config import LoraSettings, TrainConfig
    from afinar.train.objectives import Supervised

    # Instrumentation only: count real and padded tokens of every batch the SFT objective
    # collates for the loop (the loop calls `objective.collate`).
    batches: list[tuple[int, int]] = []
    original_collate = Supervised.collate

    def counting_collate(items, pad_id):
        batch = original_collate(items, pad_id)
        batches.append((int(batch["attention_mask"].sum()), int(batch["input_ids"].numel()),
                        int(batch["input_ids"].shape[1])))
        return batch

    Supervised.collate = staticmethod(counting_collate)

    marks: dict = {}
    step_losses: list[float] = []

    def on_event(event: dict) -> None:
        if event["type"] == "start":
            marks.update(rss_at_start_mb=_rss_mb(), maxrss_at_start_mb=_maxrss_mb(),
                         torch_threads=torch.get_num_threads(),
                         train_examples=event["train_examples"],
                         held_out_examples=event["held_out_examples"],
                         trainable_params=event["trainable_params"],
                         total_steps=event["total_steps"])
        elif event["type"] == "step":
            step_losses.append(event["train_loss"])
        elif event["type"] == "log" and event["message"].startswith("precision "):
            marks["precision_reason"] = event["message"]
        elif event["type"] == "end":
            marks["compiled"] = event.get("compiled")

    with tempfile.TemporaryDirectory(prefix="bench-afinar-") as tmp:
        config = TrainConfig(
            data=str(args.data), model=str(args.model), output=str(Path(tmp) / "run"),
            held_out_fraction=0.0,  # no held-out split: no evaluation at all, same 135 examples
            method="lora", lora=LoraSettings(**LORA),
            epochs=args.steps,  # enough epochs; max_steps decides
            max_steps=args.steps, learning_rate=LEARNING_RATE, batch_size=BATCH_SIZE,
            gradient_accumulation_steps=1, warmup_ratio=WARMUP_RATIO, lr_scheduler="cosine",
            weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, max_seq_length=MAX_LENGTH,
            seed=SEED, eval_steps=args.steps + 1, save_steps=args.steps + 1,
            early_stopping_patience=None, precision=args.precision, device=args.device,
            compile={"on": True, "off": False, "auto": "auto"}[args.compile])
        wall0 = time.perf_counter()
        result = recipe.train(config, on_event=on_event)
        wall = time.perf_counter() - wall0
        peak = _maxrss_mb()
        marks["device_peak_mb"] = _device_peak_mb(args.device)
        summary = result.summary
        records = [json.loads(line) for line in
                   (result.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_records = [r for r in records if r.get("type") == "train"]
    trained = batches[: summary["steps"]]
    tokens = sum(b[0] for b in trained)
    if tokens != summary["tokens_seen"]:
        marks["token_count_mismatch"] = {"collate": tokens, "summary": summary["tokens_seen"]}
    # Steady state: end of step 1 -> end of the last step, over the batches of steps 2..N.
    steps_seconds = train_records[-1]["elapsed_s"] - train_records[0]["elapsed_s"]
    marks["first_step_seconds"] = train_records[0]["elapsed_s"]
    return {
        **_side_result("afinar", summary["steps"], steps_seconds, trained[1:], peak, step_losses,
                       wall),
        "final_train_loss": summary["final_train_loss"],
        "afinar_summary": {k: summary[k] for k in ("train_seconds", "tokens_seen", "tokens_per_s",
                                                   "peak_memory_mb", "precision")},
        **marks,
    }


# --- child: TRL ----------------------------------------------------------------------------------

def child_trl(args) -> dict:
    _set_threads(args.threads)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = _read_messages(args.data)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    shipped = tokenizer.chat_template
    for row in rows:  # the training template must render exactly what the shipped one renders
        a = tokenizer.apply_chat_template(row["messages"], tokenize=False, chat_template=shipped)
        b = tokenizer.apply_chat_template(row["messages"], tokenize=False,
                                          chat_template=SMOLLM2_TRAINING_TEMPLATE)
        if a != b:
            raise SystemExit("training template renders differently from the shipped template")
    tokenizer.chat_template = SMOLLM2_TRAINING_TEMPLATE

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    precision = _resolved_precision(args.precision, args.device)  # autocast over fp32, as afinar
    bf16, fp16 = precision == "bf16", precision == "fp16"
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], bias="none",
                             task_type="CAUSAL_LM")

    marks: dict = {}
    step_end_times: list[float] = []
    log_records: list[dict] = []

    class Timing(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == 0 and "t0" not in marks:
                marks.update(t0=time.perf_counter(), rss_at_start_mb=_rss_mb(),
                             maxrss_at_start_mb=_maxrss_mb(),
                             torch_threads=torch.get_num_threads())

        def on_step_end(self, targs, state, control, **kw):
            step_end_times.append(time.perf_counter())

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log_records.append({**logs, "step": state.global_step})

    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        sft_args = SFTConfig(
            output_dir=tmp, use_cpu=args.device == "cpu", bf16=bf16, fp16=fp16,
            max_length=MAX_LENGTH, per_device_train_batch_size=BATCH_SIZE,
            gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LEARNING_RATE,
            lr_scheduler_type="cosine", warmup_steps=_warmup_steps(args.steps),
            weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
            assistant_only_loss=True, packing=False, padding_free=False,
            gradient_checkpointing=False, activation_offloading=False,
            logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[],
            disable_tqdm=True, seed=SEED, data_seed=SEED, dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=sft_args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config,
                             callbacks=[Timing()])

        # Instrumentation only: count real and padded tokens of every collated batch. accelerate's
        # dataloader collates one batch ahead, so only the first `steps` batches were trained on.
        batches: list[tuple[int, int]] = []
        collator = trainer.data_collator

        def counting_collator(examples):
            batch = collator(examples)
            mask = batch.get("attention_mask")
            real = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
            batches.append((real, int(batch["input_ids"].numel()), int(batch["input_ids"].shape[1])))
            return batch

        trainer.data_collator = counting_collator
        n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        wall0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - wall0
        peak = _maxrss_mb()
        marks["device_peak_mb"] = _device_peak_mb(args.device)
        steps = trainer.state.global_step
        prepared = trainer.train_dataset

    marks["first_step_seconds"] = step_end_times[0] - marks.pop("t0")
    steps_seconds = step_end_times[-1] - step_end_times[0]  # steps 2..N, as afinar's side
    trained = batches[1:steps]
    trl_tokens = log_records[-1].get("num_tokens") if log_records else None
    step_losses = [entry["loss"] for entry in log_records]

    # After the peak was recorded: are TRL's labels the same as afinar's, example by example?
    same = _compare_masks(args, prepared)
    return {
        **_side_result("trl", steps, steps_seconds, trained, peak, step_losses, wall),
        "trl_logged_num_tokens": trl_tokens,
        "trainable_params": n_trainable,
        "train_examples": len(rows),
        "labels_identical_to_afinar": same,
        **marks,
    }


def _compare_masks(args, prepared) -> dict:
    """Compares TRL's tokenized (input_ids, labels) with afinar's ChatEncoder output."""
    from transformers import AutoTokenizer

    from afinar.data.tokenize import ChatEncoder
    from afinar.data.validate import load_examples
    from afinar.models.load import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    encoder = ChatEncoder(tokenizer, stop_token_ids(tokenizer))
    examples = load_examples(args.data).examples
    cols = prepared.column_names
    if "labels" not in cols:
        return {"checked": 0, "note": f"no labels column in TRL's dataset ({cols})"}
    ids_same = labels_same = 0
    for example, row in zip(examples, prepared):
        ours = encoder.encode(example)
        ids_same += ours.input_ids == list(row["input_ids"])
        labels_same += ours.labels == list(row["labels"])
    return {"checked": len(examples), "input_ids_identical": ids_same,
            "labels_identical": labels_same}


# --- parent --------------------------------------------------------------------------------------

def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _run_child(side: str, args, threads: int, script: Path | None = None,
               precision: str | None = None) -> dict:
    """Runs `script` (default: this file) with --child SIDE (in `precision`, default the
    requested one); its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with tempfile.NamedTemporaryFile(prefix=f"bench-{side}-", suffix=".json",
                                     delete=False) as handle:
        out = Path(handle.name)
    cmd = [sys.executable, str((script or Path(__file__)).resolve()), "--child", side,
           "--child-out", str(out), "--steps", str(args.steps), "--threads", str(threads),
           "--model", str(args.model), "--data", str(args.data), "--precision", precision or args.precision,
           "--compile", args.compile, "--device", args.device]
    load_before = _loadavg()
    print(f"[{side}] running {args.steps} steps ({threads} threads)...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"[{side}] child failed with exit code {proc.returncode}")
    result = json.loads(out.read_text())
    out.unlink(missing_ok=True)
    result["process_seconds"] = round(elapsed, 2)
    result["loadavg_before"] = load_before
    result["loadavg_after"] = _loadavg()
    print(f"[{side}] done in {elapsed:.1f}s", flush=True)
    return result


def _table(a: dict, b: dict, ratios: dict) -> str:
    rows = [
        ("optimizer steps", "steps", "{:d}"),
        ("timed steps (s)", "steps_seconds", "{:.2f}"),
        ("tokens (non-pad)", "tokens", "{:d}"),
        ("padded tokens", "padded_tokens", "{:d}"),
        ("longest sequence", "max_batch_width", "{:d}"),
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("padded tokens/s", "padded_tokens_per_s", "{:.1f}"),
        ("GFLOP/s (counted)", "gflop_per_s", "{:.1f}"),
        ("share of matmul peak", "share_of_matmul_peak", "{:.1%}"),
        ("first step (s)", "first_step_seconds", "{:.1f}"),
        ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
        ("peak GPU memory (MB)", "device_peak_mb", "{:.0f}"),
        ("RSS at step 1 (MB)", "rss_at_start_mb", "{:.0f}"),
        ("final train loss", "final_train_loss", "{:.4f}"),
        ("mean train loss", "mean_train_loss", "{:.4f}"),
        ("torch threads", "torch_threads", "{:d}"),
        ("child process (s)", "process_seconds", "{:.1f}"),
    ]
    lines = [f"{'':22}{'afinar':>12}{'TRL':>12}{'afinar/TRL':>12}"]
    ratio_for = dict(ratios)
    for label, key, fmt in rows:
        cells = []
        for side in (a, b):
            value = side.get(key)
            cells.append("-" if value is None else fmt.format(value))
        ratio = ratio_for.get(key)
        lines.append(f"{label:22}{cells[0]:>12}{cells[1]:>12}"
                     f"{('' if ratio is None else f'{ratio:.2f}x'):>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per side (default 12; --smoke: 2)")
    parser.add_argument("--out", type=Path, help="default bench/results/train.json")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OMP threads for both sides (default: torch's default)")
    parser.add_argument("--model", type=Path, help=f"default {DEFAULT_MODEL}; --smoke: a tiny "
                        "random model")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="both sides; auto: afinar's measured choice, which TRL then uses")
    parser.add_argument("--compile", choices=["on", "off", "auto"], default=None,
                        help="afinar's `compile` setting (default on: steady-state speed; the "
                        "compile itself is in first_step_seconds; --smoke: off)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: both sides; on "
                        "a GPU the peak GPU memory is reported as device_peak_mb")
    parser.add_argument("--child", choices=["afinar", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    _smoke.add_flag(parser)
    args = parser.parse_args(argv)

    if args.child:
        result = (child_afinar if args.child == "afinar" else child_trl)(args)
        args.child_out.write_text(json.dumps(result))
        return 0

    args.out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "train.json")
    args.steps = args.steps or (2 if args.smoke else 12)
    args.compile = args.compile or ("off" if args.smoke else "on")
    args.model = Path(_smoke.smoke_model(args.model) if args.smoke
                      else args.model or DEFAULT_MODEL)

    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no converted model; run any `afinar` command once "
                         "(e.g. `afinar validate examples/soporte-triaje/data.jsonl`) or pass --model")
    threads = args.threads
    if threads is None:
        import torch  # only to read its default; the children set it explicitly

        threads = torch.get_num_threads()

    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "afinar"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None

    peak = matmul_peak(args.model, threads, args.device, 0.05 if args.smoke else 0.5)
    flops_per_token = 4 * frozen_linear_params(args.model)
    print(f"matmul peak on the model's shapes, {threads} threads: fp32 {peak['fp32']} GFLOP/s, "
          f"bf16 {peak['bf16']} GFLOP/s", flush=True)
    order = ["afinar", "trl"]
    results = {"afinar": _run_child("afinar", args, threads)}
    # `auto` is afinar's measured choice (plan/speed.py): TRL trains in what afinar chose.
    precision = results["afinar"]["afinar_summary"]["precision"]
    print(f"afinar trained in {precision}"
          + (f" ({results['afinar'].get('precision_reason')})" if args.precision == "auto" else ""),
          flush=True)
    results["trl"] = _run_child("trl", args, threads, precision=precision)
    for result in results.values():
        gflops = result["padded_tokens_per_s"] * flops_per_token / 1e9
        result["gflop_per_s"] = round(gflops, 1)
        result["share_of_matmul_peak"] = round(gflops / peak[precision], 3)
    a, b = results["afinar"], results["trl"]
    ratios = {
        "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
        "peak_rss_mb": a["peak_rss_mb"] / b["peak_rss_mb"],
        "steps_seconds": a["steps_seconds"] / b["steps_seconds"],
        "padded_tokens_per_s": a["padded_tokens_per_s"] / b["padded_tokens_per_s"],
    }
    print()
    print(_table(a, b, ratios))
    print()
    print(f"tokens/s ratio afinar/TRL: {ratios['tokens_per_s']:.2f} (>1: afinar faster)")
    print(f"peak-RSS ratio afinar/TRL: {ratios['peak_rss_mb']:.2f} (<1: afinar smaller)")
    print(f"padded-tokens/s ratio afinar/TRL: {ratios['padded_tokens_per_s']:.2f} (compute speed "
          "per position; tokens/s also credits afinar's length-grouped batches for less padding)")
    labels = b.get("labels_identical_to_afinar", {})
    if labels.get("checked"):
        print(f"label masks identical to afinar's: {labels['labels_identical']}/{labels['checked']} "
              f"examples (input ids: {labels['input_ids_identical']}/{labels['checked']})")
    print(f"share of the {precision} matmul peak ({peak[precision]} GFLOP/s; 4 FLOPs per frozen "
          f"linear weight per padded token): afinar {a['share_of_matmul_peak']:.0%}, "
          f"TRL {b['share_of_matmul_peak']:.0%}")
    print(f"first step (warm-up; afinar's compile): afinar {a['first_step_seconds']:.1f} s, "
          f"TRL {b['first_step_seconds']:.1f} s")
    print(f"run order: {' then '.join(order)}; load average before/after each: "
          + "; ".join(f"{s} {results[s]['loadavg_before']} -> {results[s]['loadavg_after']}"
                      for s in order))
    print("noisy on a shared 2-core machine: compare ratios across repeated runs, not one run.")

    report = {
        "benchmark": "train", "smoke": args.smoke, "steps": args.steps, "threads": threads, "run_order": order,
        "settings": {"lora": LORA, "batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE,
                     "lr_scheduler": "cosine", "warmup_steps": _warmup_steps(args.steps),
                     "max_length": MAX_LENGTH, "max_grad_norm": MAX_GRAD_NORM, "seed": SEED,
                     "precision": precision, "compile": args.compile, "device": args.device,
                     "loss": "assistant tokens only"},
        "matmul_peak_gflop_per_s": peak, "flops_per_token_counted": flops_per_token,
        "model": str(args.model), "data": str(args.data),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "loadavg_end": _loadavg()},
        "versions": versions,
        "results": results,
        "ratios_afinar_over_trl": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
