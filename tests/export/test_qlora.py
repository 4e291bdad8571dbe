"""QLoRA runs (quantization 4bit/8bit) at inference and export: the adapter is merged into the
de-quantised base it was trained against, so `afinar.load`, the merged export and plain
transformers on that export all give the training-time model's logits."""

from __future__ import annotations

import json

import pytest
import torch

import afinar
from afinar import rundir
from afinar.config import TrainConfig, load_train_config
from afinar.errors import AfinarError
from afinar.export import export
from afinar.train.recipe import train

PROMPT = [{"role": "user", "content": "pedido 7 llegó roto"}]


def _train(tmp_path, model_dir, data, quantization, precision="fp32", steps=6):
    config = TrainConfig(data=str(data), model=str(model_dir), output=str(tmp_path / "run"),
                         quantization=quantization, precision=precision, learning_rate=1e-2,
                         batch_size=4, max_steps=steps, seed=0, evaluate=False)
    return train(config).run_dir


def _training_model(run, quantization):
    """The model as training computed it: the quantised base and the unmerged adapter."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from afinar.models.quantize import load_quantized
    from afinar.models.registry import resolve_model

    base = load_quantized(resolve_model(str(run)), quantization, torch.float32)
    model = PeftModel.from_pretrained(base, str(run / rundir.ADAPTER_DIR)).eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            # Training mode is how bitsandbytes trains 8-bit layers on a CPU (x @ de-quantised
            # W); in eval mode it would round the activations to int8 too.
            module.train()
    return model


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits.float()


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_run_loads_and_exports_the_weights_it_trained_against(
        tmp_path, tiny_model_dir, small_chat_file, quantization):
    from transformers import AutoModelForCausalLM

    run = _train(tmp_path, tiny_model_dir, small_chat_file, quantization)
    assert json.loads((run / rundir.RUN_FILE).read_text())["summary"]["quantization"] \
        == quantization

    said = []
    loaded = afinar.load(str(run), device="cpu", notify=said.append)
    assert loaded.resolved.quantization == quantization and loaded.resolved.precision == "fp32"
    assert any("QLoRA run" in line for line in said)
    assert not any("Linear4bit" in type(m).__name__ or "Linear8bit" in type(m).__name__
                   for m in loaded.model.modules())
    ids = torch.tensor([loaded.prompt_ids(PROMPT)])
    ours = _logits(loaded.model, ids)
    trained = _logits(_training_model(run, quantization), ids)
    diff = (ours - trained).abs().max().item()
    print(f"{quantization}: load vs training-time logits max diff {diff:.2e}")
    assert diff < 1e-4

    # The original base + adapter is another model: the adapter corrects the quantised weights.
    from afinar.models.load import load_causal_lm
    from afinar.models.adapters import load_adapter

    plain = load_adapter(load_causal_lm(loaded.resolved, torch.device("cpu")),
                         loaded.resolved.adapter).eval()
    off = (_logits(plain, ids) - trained).abs().max().item()
    print(f"{quantization}: original base + adapter vs training-time logits {off:.2e}")
    assert off > 100 * diff

    notes = []
    result = export(str(run), to="merged", output=str(tmp_path / "merged"), prompts=3,
                    notify=notes.append)
    assert result.qlora == quantization and result.verification.passed
    note = f"the adapter is merged into the de-quantised {quantization} base weights"
    assert any(note in line for line in notes)
    verification = json.loads((result.output / "verification.json").read_text())
    assert f"de-quantised {quantization} base" in verification["summary"]["reference"]
    meta = json.loads((result.output / "afinar.json").read_text())
    assert meta["merged_into"] == f"de-quantised {quantization} base weights (QLoRA run)"
    config = json.loads((result.output / "config.json").read_text())
    assert "quantization_config" not in config

    exported = AutoModelForCausalLM.from_pretrained(result.output).eval()
    diff = (_logits(exported, ids) - trained).abs().max().item()
    print(f"{quantization}: merged export (plain transformers) vs training-time logits {diff:.2e}")
    assert diff < 1e-4


def test_a_bf16_run_is_quantised_again_from_bf16_weights(tmp_path, tiny_model_dir,
                                                        small_chat_file):
    """NF4 codes taken from bf16 weights differ from those taken from fp32 ones: the base is
    rebuilt from weights in the precision run.json records, as training built it (the loop
    quantises with load_quantized in COMPUTE_DTYPES[precision])."""
    import bitsandbytes as bnb

    from afinar.models.load import load_inference_base
    from afinar.models.quantize import load_quantized
    from afinar.models.registry import resolve_model

    # An fp32 run said to be bf16: training in bf16 on a CPU without native bf16 is slow.
    run = _train(tmp_path, tiny_model_dir, small_chat_file, "4bit", steps=1)
    info = json.loads((run / rundir.RUN_FILE).read_text())
    rundir.write_json_atomic(run / rundir.RUN_FILE, {**info, "precision": "bf16"})
    resolved = resolve_model(str(run))
    assert resolved.quantization == "4bit" and resolved.precision == "bf16"
    base = dict(load_inference_base(resolved).named_modules())

    def dequantised(dtype):
        model = load_quantized(resolved, "4bit", dtype)
        return {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    as_trained, from_fp32 = dequantised(torch.bfloat16), dequantised(torch.float32)
    assert all(torch.equal(base[name].weight, w) for name, w in as_trained.items())
    assert sum(not torch.equal(base[name].weight, w) for name, w in from_fp32.items()) > 0
    assert all(p.dtype == torch.float32 for p in base[""].parameters())


def test_dequantize_refuses_a_layer_repacked_for_cpu_inference(tiny_model_dir):
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from afinar.models.quantize import dequantize_linears, load_quantized
    from afinar.models.registry import resolve_model

    model = load_quantized(resolve_model(str(tiny_model_dir)), "4bit", torch.float32)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # What bitsandbytes does at the first eval-mode forward on an AVX512-BF16 CPU; turned off.
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    weight = layers[0].weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data,
                                                                     weight.quant_state)
    with pytest.raises(AfinarError, match="repacked"):
        dequantize_linears(model)


def test_quantization_is_for_lora_only(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: data.jsonl\nmethod: full\nquantization: 4bit\n", encoding="utf-8")
    with pytest.raises(AfinarError, match="quantization 4bit is for LoRA"):
        load_train_config(config)
