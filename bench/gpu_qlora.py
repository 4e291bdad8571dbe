"""GPU check (run on a lent GPU machine): QLoRA on a Llama-3-8B shape, and LoRA MFU on the
embedded model's shape. Random weights: memory and speed need the shape, not trained weights.

    python bench/gpu_qlora.py [--seq-len 2048] [--steps 6] [--out bench/results/gpu_qlora.json]

1. Llama-3-8B shape (32 layers, hidden 4096, 128,256 vocabulary), LoRA r=16 on every linear,
   base in 4-bit NF4 with double quantisation and bf16 compute (afinar's load_quantized), batch
   1, sequence 2048, gradient checkpointing: peak GPU memory (torch's allocator; the guides
   promise 12 GB), tokens/s, and afinar's plan for the same run beside the measured peak.
   The random bf16 weights are built on the GPU and saved once to a scratch folder, then loaded
   through the same code path `afinar train` uses.
2. SmolLM2-135M shape, LoRA in bf16, batch 8 × 512: tokens/s and model FLOPs utilisation against
   the GPU's measured bf16 matmul peak.

Only the libraries already installed are used (no download: the GPU machine reaches nothing);
rerunnable: the 8B folder is reused when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
SMOLLM2_135M = dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


def _config(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _random_folder(values: dict, folder: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(_config(values), dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    model.save_pretrained(tmp)
    del model
    torch.cuda.empty_cache()
    tmp.rename(folder)
    return folder


def _train_steps(model, seq_len: int, batch: int, steps: int, vocab: int, autocast: bool):
    """afinar's loss (head on labelled rows, chunked) and AdamW on the trainable weights."""
    import torch

    from afinar.train.losses import SupervisedLoss

    loss_model = SupervisedLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq_len), device="cuda")
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100  # half prompt, half answer, as chat data is
    mask = torch.ones_like(ids)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            total, n, _ = loss_model(ids, mask, labels)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    return batch * seq_len / (sum(steady) / len(steady)), float(total / n)


def qlora_8b(seq_len: int, steps: int, scratch: Path) -> dict:
    import torch

    from afinar.config import LoraSettings, TrainConfig
    from afinar.models import adapters
    from afinar.models.quantize import load_quantized
    from afinar.models.registry import ResolvedModel
    from afinar.plan.hardware import this_machine
    from afinar.plan.planner import PlanData, make_plan

    folder = _random_folder(LLAMA3_8B, scratch / "llama-3-8b-shape")
    config = TrainConfig(data="-", model=str(folder), quantization="4bit", batch_size=1,
                         gradient_checkpointing=True, max_seq_length=seq_len, precision="bf16")
    target = this_machine(torch.device("cuda"), "bf16")
    plan = make_plan(config, _config(LLAMA3_8B), PlanData([seq_len], [seq_len // 2], 1), target,
                     "bf16", target.memory_bytes, 0)
    torch.cuda.reset_peak_memory_stats()
    model = load_quantized(ResolvedModel(str(folder), str(folder), str(folder)), "4bit",
                           torch.bfloat16, gradient_checkpointing=True, device="cuda")
    model.config.use_cache = False
    model = adapters.attach(model, "lora", LoraSettings())
    loaded = torch.cuda.max_memory_allocated() / 2**30
    tokens_per_s, loss = _train_steps(model, seq_len, 1, steps, LLAMA3_8B["vocab_size"], True)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    return {"shape": "llama-3-8b", "quantization": "4bit nf4 double-quant, bf16 compute",
            "seq_len": seq_len, "batch_size": 1, "gradient_checkpointing": True,
            "peak_gpu_memory_gb": round(peak, 2), "after_load_gb": round(loaded, 2),
            "planned_peak_gb": round(plan.chosen.memory.total / 2**30, 2),
            "plan_over_measured": round(plan.chosen.memory.total / 2**30 / peak, 3),
            "tokens_per_s": round(tokens_per_s, 1), "final_loss": round(loss, 3)}


def lora_mfu_135m(steps: int, scratch: Path) -> dict:
    import torch

    from afinar.config import LoraSettings
    from afinar.models import adapters
    from afinar.models.load import load_training_model
    from afinar.models.registry import ResolvedModel
    from afinar.plan.hardware import measure_tflops
    from afinar.plan.memory import weight_budget
    from afinar.plan.planner import _flops_per_token

    folder = _random_folder(SMOLLM2_135M, scratch / "smollm2-135m-shape")
    model = load_training_model(ResolvedModel(str(folder), str(folder), str(folder)),
                                torch.bfloat16).to("cuda")
    model.config.use_cache = False
    model = adapters.attach(model, "lora", LoraSettings())
    batch, seq_len = 8, 512
    tokens_per_s, _ = _train_steps(model, seq_len, batch, steps, SMOLLM2_135M["vocab_size"], True)
    config = _config(SMOLLM2_135M)
    flops = _flops_per_token(weight_budget(config, "lora", LoraSettings(), "bf16"), config,
                             "lora", seq_len, 0.5, False)
    peak = measure_tflops(torch.device("cuda"), torch.bfloat16, rows=4096, inner=4096,
                          cols=4096, seconds=1.0)
    return {"shape": "smollm2-135m", "precision": "bf16 (frozen linears stored in bf16)",
            "batch_size": batch, "seq_len": seq_len, "tokens_per_s": round(tokens_per_s),
            "flops_per_token": round(flops), "bf16_matmul_peak_tflops": round(peak, 1),
            "mfu": round(tokens_per_s * flops / (peak * 1e12), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--scratch", default=os.environ.get("TMPDIR", "/tmp") + "/afinar-gpu")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_qlora.json"))
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_qlora.py needs a CUDA GPU")
    scratch = Path(args.scratch)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, run in (("qlora_8b", lambda: qlora_8b(args.seq_len, args.steps, scratch)),
                      ("lora_mfu_135m", lambda: lora_mfu_135m(args.steps, scratch))):
        try:
            result[name] = run()
        except Exception as exc:  # one part failing must not lose the other's numbers
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        print(name, json.dumps(result[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
