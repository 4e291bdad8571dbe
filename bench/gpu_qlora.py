"""GPU check (run on a lent GPU machine): QLoRA on a Llama-3-8B shape, and LoRA MFU on the
embedded model's shape. Random weights: memory and speed need the shape, not trained weights.

    python bench/gpu_qlora.py [--seq-len 2048] [--steps 6] [--out bench/results/gpu_qlora.json]
    python bench/gpu_qlora.py --smoke --out PATH    # does it still run? (CPU or GPU)

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

`--smoke` runs both parts through the same code on a tiny Llama shape (2 layers, hidden 64), two
steps of 32 tokens, a small matmul probe, in a temporary folder: on the GPU when there is one,
else on the CPU (bitsandbytes' 4-bit layers and bf16 autocast run there too), where the peak GPU
memory is null. It checks the plan, loading, adapter and loss code paths and the result file,
not the GPU numbers. The tests run it on the CPU.
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
sys.path.insert(0, str(ROOT / "bench"))
import _smoke  # noqa: E402

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
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=600,
            max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _config(values: dict):
    from transformers import AutoConfig

    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float | None:
    """Peak GPU memory allocated by torch; None on a CPU (a smoke run)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def _random_folder(values: dict, folder: Path, device: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_config(values), dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    model.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.rename(folder)
    return folder


def _train_steps(model, seq_len: int, batch: int, steps: int, vocab: int, autocast: bool,
                 device: str):
    """afinar's loss (head on labelled rows, chunked) and AdamW on the trainable weights."""
    import torch

    from afinar.losses.supervised import SupervisedLoss

    loss_model = SupervisedLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100  # half prompt, half answer, as chat data is
    mask = torch.ones_like(ids)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            total, n, _ = loss_model(ids, mask, labels)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    return batch * seq_len / (sum(steady) / len(steady)), float((total / n).detach())


def qlora_8b(seq_len: int, steps: int, scratch: Path, device: str = "cuda",
             shape: tuple[str, dict] = ("llama-3-8b", LLAMA3_8B)) -> dict:
    import torch

    from afinar.config import LoraSettings, TrainConfig
    from afinar.models import adapters
    from afinar.models.quantize import load_quantized
    from afinar.models.registry import ResolvedModel
    from afinar.plan.hardware import this_machine
    from afinar.plan.planner import PlanData, make_plan

    name, values = shape
    folder = _random_folder(values, scratch / f"{name}-shape", device)
    config = TrainConfig(data="-", model=str(folder), quantization="4bit", batch_size=1,
                         gradient_checkpointing=True, max_seq_length=seq_len, precision="bf16")
    target = this_machine(torch.device(device), "bf16")
    plan = make_plan(config, _config(values), PlanData([seq_len], [seq_len // 2], 1), target,
                     "bf16", target.memory_bytes, 0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_quantized(ResolvedModel(str(folder), str(folder), str(folder)), "4bit",
                           torch.bfloat16, gradient_checkpointing=True, device=device)
    model.config.use_cache = False
    model = adapters.attach(model, "lora", LoraSettings())
    loaded = _peak_gb(device)
    tokens_per_s, loss = _train_steps(model, seq_len, 1, steps, values["vocab_size"], True,
                                      device)
    peak = _peak_gb(device)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    planned = plan.chosen.memory.total / 2**30
    return {"shape": name, "device": device,
            "quantization": "4bit nf4 double-quant, bf16 compute",
            "seq_len": seq_len, "batch_size": 1, "gradient_checkpointing": True,
            "peak_gpu_memory_gb": None if peak is None else round(peak, 2),
            "after_load_gb": None if loaded is None else round(loaded, 2),
            "planned_peak_gb": round(planned, 4),  # 4 places: a smoke run plans MBs
            "plan_over_measured": None if peak is None else round(planned / peak, 3),
            "tokens_per_s": round(tokens_per_s, 1), "final_loss": round(loss, 3)}


def lora_mfu_135m(steps: int, scratch: Path, device: str = "cuda",
                  shape: tuple[str, dict] = ("smollm2-135m", SMOLLM2_135M), batch: int = 8,
                  seq_len: int = 512, probe: int = 4096) -> dict:
    """`probe`: the matmul side for the bf16 peak (smaller in a smoke run: a CPU without native
    bf16 takes a minute for one 4096-cube)."""
    import torch

    from afinar.config import LoraSettings
    from afinar.models import adapters
    from afinar.models.load import load_training_model
    from afinar.models.registry import ResolvedModel
    from afinar.plan.hardware import measure_tflops
    from afinar.plan.memory import weight_budget
    from afinar.plan.planner import _flops_per_token

    name, values = shape
    folder = _random_folder(values, scratch / f"{name}-shape", device)
    model = load_training_model(ResolvedModel(str(folder), str(folder), str(folder)),
                                torch.bfloat16).to(device)
    model.config.use_cache = False
    model = adapters.attach(model, "lora", LoraSettings())
    tokens_per_s, _ = _train_steps(model, seq_len, batch, steps, values["vocab_size"], True,
                                   device)
    config = _config(values)
    flops = _flops_per_token(weight_budget(config, "lora", LoraSettings(), "bf16"), config,
                             "lora", seq_len, 0.5, False)
    peak = measure_tflops(torch.device(device), torch.bfloat16, rows=probe, inner=probe,
                          cols=probe, seconds=1.0 if probe >= 4096 else 0.1)
    return {"shape": name, "device": device, "precision": "bf16 (frozen linears stored in bf16)",
            "batch_size": batch, "seq_len": seq_len, "tokens_per_s": round(tokens_per_s),
            "flops_per_token": round(flops), "bf16_matmul_peak_tflops": round(peak, 3),
            "mfu": round(tokens_per_s * flops / (peak * 1e12), 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, help="default 2048; --smoke: 32")
    parser.add_argument("--steps", type=int, help="default 6; --smoke: 2")
    parser.add_argument("--scratch", help="default $TMPDIR/afinar-gpu; --smoke: a temporary "
                        "folder")
    parser.add_argument("--out", help="default bench/results/gpu_qlora.json")
    _smoke.add_flag(parser)
    args = parser.parse_args()
    out = _smoke.out_path(parser, args, ROOT / "bench" / "results" / "gpu_qlora.json")

    import torch

    smoke = args.smoke
    if not torch.cuda.is_available() and not smoke:
        sys.exit("bench/gpu_qlora.py needs a CUDA GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seq_len, steps = args.seq_len or (32 if smoke else 2048), args.steps or (2 if smoke else 6)
    if args.scratch or not smoke:
        scratch = Path(args.scratch or os.environ.get("TMPDIR", "/tmp") + "/afinar-gpu")
    else:
        scratch = _smoke.scratch("afinar-smoke-gpu-")
    tiny = {"shape": ("tiny", TINY)} if smoke else {}
    result = {"smoke": smoke, "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "torch": torch.__version__}
    parts = (("qlora_8b", lambda: qlora_8b(seq_len, steps, scratch, device, **tiny)),
             ("lora_mfu_135m", lambda: lora_mfu_135m(
                 steps, scratch, device, **tiny, **({"batch": 2, "seq_len": seq_len, "probe": 256}
                                                    if smoke else {}))))
    for name, run in parts:
        try:
            result[name] = run()
        except Exception as exc:  # one part failing must not lose the other's numbers
            if smoke:
                raise
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        print(name, json.dumps(result[name]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
