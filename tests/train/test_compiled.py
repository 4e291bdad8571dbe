"""torch.compile of the decoder layers (train/compiled.py): same losses and LoRA gradients as
the eager fp32 path, and the rules `compile: auto` follows. Inductor builds C++ with the
machine's compiler: these tests compile for real (about 20-40 s on 2 cores)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from afinar import rundir
from afinar.config import LoraSettings, TrainConfig
from afinar.models import adapters
from afinar.train.compiled import compile_layers, has_cpp_compiler, should_compile
from afinar.losses.supervised import SupervisedLoss
from afinar.train.recipe import train
from conftest import build_tiny_model
from test_losses_and_batching import _batch

needs_compiler = pytest.mark.skipif(not has_cpp_compiler(), reason="no C++ compiler here")


def _loss_and_grads(loss_model, batch):
    total, count, _ = loss_model(*batch)
    loss = total / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in loss_model.model.named_parameters()
             if p.requires_grad}
    loss_model.model.zero_grad(set_to_none=True)
    return loss.item(), grads


def _lora_model(model, seed=0):
    torch.manual_seed(seed)
    model = adapters.attach(model, "lora", LoraSettings(r=8, alpha=16, dropout=0.0))
    for name, param in model.named_parameters():  # B starts at zero: make every path count
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


@needs_compiler
def test_compiled_layers_match_eager_loss_and_lora_gradients(tiny_tokenizer):
    model = _lora_model(build_tiny_model(tiny_tokenizer))
    eager = SupervisedLoss(model)
    compiled_model = copy.deepcopy(model)
    assert compile_layers(compiled_model) == 2
    compiled = SupervisedLoss(compiled_model)
    vocab = len(tiny_tokenizer)
    # Two lengths: the second must reuse the dynamic graph, not break it.
    for lengths, supervised in (([12, 7, 10], [3, 7, 5]), ([20, 16], [9, 4])):
        batch = _batch(lengths, supervised, vocab=vocab)
        want_loss, want = _loss_and_grads(eager, batch)
        got_loss, got = _loss_and_grads(compiled, batch)
        assert abs(got_loss - want_loss) / want_loss < 1e-4
        assert want.keys() == got.keys() and len(want) > 0
        for name in want:
            cosine = torch.nn.functional.cosine_similarity(
                got[name].flatten(), want[name].flatten(), dim=0)
            assert cosine > 0.9999, (name, cosine.item())
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)


@needs_compiler
def test_compiled_bf16_layers_stay_within_tolerance_of_fp32(tiny_tokenizer, tiny_model_dir):
    """What a CPU with native bf16 (AMX, AVX512-BF16) runs with `precision: auto`: frozen
    weights stored in bf16, autocast, compiled layers. Against the eager fp32 path: relative
    loss error < 1e-2 and LoRA gradient cosine > 0.999 (this CPU emulates bf16 slowly; the
    model is tiny)."""
    from afinar.models.load import load_training_model
    from afinar.models.registry import resolve_model

    resolved = resolve_model(str(tiny_model_dir))
    reference = SupervisedLoss(_lora_model(load_training_model(resolved)))
    model = _lora_model(load_training_model(resolved, torch.bfloat16))
    compile_layers(model)
    compiled = SupervisedLoss(model)
    for lengths, supervised in (([12, 7, 10], [3, 7, 5]), ([20, 16], [9, 4])):
        batch = _batch(lengths, supervised, vocab=len(tiny_tokenizer))
        want_loss, want = _loss_and_grads(reference, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_loss, got = _loss_and_grads(compiled, batch)
        assert abs(got_loss - want_loss) / want_loss < 1e-2
        for name in want:
            cosine = torch.nn.functional.cosine_similarity(
                got[name].float().flatten(), want[name].flatten(), dim=0)
            assert cosine > 0.999, (name, cosine.item())


def test_auto_compiles_only_where_it_pays_and_works():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    plain = dict(device=cpu, world=1, quantization="none", checkpointing=False,
                 planned_train_seconds=600)
    assert should_compile("auto", **plain)[0] is has_cpp_compiler()
    assert should_compile(False, **plain) == (False, "compile: off")
    for change, words in (({"planned_train_seconds": 30}, "pays from"),
                          ({"world": 2}, "multi-process"), ({"quantization": "4bit"}, "quantized"),
                          ({"checkpointing": True}, "checkpointing"), ({"device": gpu}, "CPUs"),
                          ({"sharded": True}, "FSDP/DeepSpeed")):
        on, why = should_compile("auto", **{**plain, **change})
        assert not on and words in why
    assert should_compile(True, **{**plain, "device": gpu})[0]  # asked for: done


@needs_compiler
def test_compiled_run_trains_like_the_eager_one(tmp_path, tiny_model_dir, small_chat_file):
    """The whole loop with compile: true gives the eager run's losses, step by step, and an
    adapter with the same tensors' names (compiling must not rename the state dict)."""
    runs = {}
    for setting in (False, True):
        config = TrainConfig(data=str(small_chat_file), model=str(tiny_model_dir),
                             output=str(tmp_path / f"run-{setting}"), learning_rate=1e-2,
                             batch_size=4, max_steps=6, eval_steps=3, seed=0, precision="fp32",
                             compile=setting, preserve=False)
        result = train(config)
        assert result.summary["compiled"] is setting
        runs[setting] = result.run_dir
    losses = {}
    for setting, run in runs.items():
        records = [json.loads(line) for line in
                   (run / rundir.METRICS_FILE).read_text().splitlines()]
        losses[setting] = [r.get("train_loss", r.get("eval_loss")) for r in records]
    assert len(losses[True]) == len(losses[False]) > 6
    for got, want in zip(losses[True], losses[False]):
        assert abs(got - want) / want < 1e-3, (losses[True], losses[False])
    from safetensors import safe_open

    names = []
    for run in runs.values():
        with safe_open(run / rundir.ADAPTER_DIR / "adapter_model.safetensors", "pt") as handle:
            names.append(sorted(handle.keys()))
    assert names[0] == names[1]
