"""Every precision path on any CPU, and `train()` again and again in one process.

A CPU without native bf16 still runs the bf16 autocast path here (slowly; the model is tiny), and
a CPU with it still runs fp32. What `precision: auto` decides on a CPU is measured (a probed step
in each precision, plan/speed.py; tests/plan/test_speed.py): tests read the choice a run recorded
rather than assume it. The one test that needs `auto` to land on bf16 whatever this CPU measures
replaces only the verdict (an AMX or AVX512-BF16 CPU cannot be conjured on a machine without
one); everything after that decision runs for real.
"""

from __future__ import annotations

import json

import pytest
import torch

from afinar import rundir
from afinar.config import TrainConfig
from afinar.errors import AfinarError
from afinar.models import adapters
from afinar.models import load as load_mod
from afinar.plan import speed
from afinar.train import recipe
from afinar.train.recipe import train


def _config(tmp_path, name, data, model, precision, **extra) -> TrainConfig:
    return TrainConfig(data=str(data), model=str(model), output=str(tmp_path / name),
                       precision=precision, learning_rate=1e-2, batch_size=4, max_steps=4,
                       eval_steps=2, seed=0, evaluate=False, **extra)


def _matmul_dtypes(monkeypatch) -> list[torch.dtype]:
    """Records the output dtype of the first decoder projection in every training forward."""
    seen: list[torch.dtype] = []
    real_attach = adapters.attach

    def attach(model, method, lora):
        wrapped = real_attach(model, method, lora)
        layer = wrapped.get_base_model().model.layers[0].self_attn.q_proj
        layer.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        return wrapped

    monkeypatch.setattr(adapters, "attach", attach)
    return seen


def _run_precision(run) -> str:
    return json.loads((run.run_dir / rundir.RUN_FILE).read_text())["precision"]


def test_train_again_and_again_in_one_process_with_any_precision(tmp_path, tiny_model_dir,
                                                                 small_chat_file, monkeypatch):
    dtypes = _matmul_dtypes(monkeypatch)
    for i, precision in enumerate(["fp32", "bf16", "fp32", "auto", "bf16"]):
        dtypes.clear()
        result = train(_config(tmp_path, f"run{i}", small_chat_file, tiny_model_dir, precision))
        picked = precision
        if precision == "auto":  # what this CPU measured for this model
            info = json.loads((result.run_dir / rundir.RUN_FILE).read_text())
            picked = speed.decide(info["precision_probe_seconds"])[0]
        assert _run_precision(result) == picked
        assert result.summary["steps"] == 4
        assert (result.run_dir / rundir.ADAPTER_DIR / "adapter_model.safetensors").is_file()
        expected = torch.bfloat16 if picked == "bf16" else torch.float32
        assert dtypes and set(dtypes) == {expected}, (precision, set(dtypes))
        history = [json.loads(line) for line in
                   (result.run_dir / rundir.METRICS_FILE).read_text().splitlines()]
        evals = [r["eval_loss"] for r in history if r["type"] == "eval"]
        assert all(map(torch.isfinite, torch.tensor(evals)))
        assert evals[-1] < evals[0], (precision, evals)  # it learned, in either precision


@pytest.mark.parametrize("fast_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_without_a_measurement_auto_follows_the_cpu_flags(monkeypatch, fast_bf16, expected):
    """pick_precision is the rule for what cannot be measured alone (several processes)."""
    monkeypatch.setattr(load_mod, "cpu_has_fast_bf16", lambda: fast_bf16)
    assert load_mod.pick_precision("auto", torch.device("cpu")) == expected
    for explicit in ("fp32", "bf16"):  # an explicit choice is kept on every CPU
        assert load_mod.pick_precision(explicit, torch.device("cpu")) == explicit


def test_fast_bf16_is_read_from_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert load_mod.cpu_has_fast_bf16() == native


def test_auto_on_a_bf16_cpu_after_an_fp32_run(tmp_path, tiny_model_dir, small_chat_file,
                                              monkeypatch):
    """The defect seen on an AMX machine: an fp32 run, then `auto` (= bf16 there) in the same
    process failed inside accelerate."""
    first = train(_config(tmp_path, "fp32", small_chat_file, tiny_model_dir, "fp32"))
    assert _run_precision(first) == "fp32"
    # The verdict of a CPU where bf16 measures faster (this one may not be such a CPU).
    monkeypatch.setattr(speed, "decide", lambda measured: ("bf16", "precision auto: bf16"))
    second = train(_config(tmp_path, "auto", small_chat_file, tiny_model_dir, "auto"))
    assert _run_precision(second) == "bf16"


def test_user_errors_are_found_before_anything_heavy(tmp_path, tiny_model_dir, small_chat_file,
                                                     monkeypatch):
    def heavy(*args, **kwargs):
        raise AssertionError("built the accelerator or loaded weights before checking the input")

    monkeypatch.setattr(recipe, "make_accelerator", heavy)
    monkeypatch.setattr(recipe, "load_training_model", heavy)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "x"}]}\n')
    cases = [
        (dict(data=str(tmp_path / "missing.jsonl")), "no such file (data)"),
        (dict(validation_data=str(tmp_path / "nope.jsonl")), "no such file (validation_data)"),
        (dict(checks=str(tmp_path / "checks.yaml")), "no such file (checks)"),
        (dict(model=str(tmp_path / "no-model")), "not found"),
        (dict(data=str(bad)), "problem(s) make this data unusable"),
        (dict(precision="fp16", device="cpu"), "precision fp16 is for GPUs"),
    ]
    for i, (change, expected) in enumerate(cases):
        values = dict(data=str(small_chat_file), model=str(tiny_model_dir),
                      output=str(tmp_path / f"r{i}"), precision="bf16") | change
        with pytest.raises(AfinarError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            train(TrainConfig(**values))
        assert not (tmp_path / f"r{i}").exists()  # nothing written for a run that never started


def test_frozen_weights_are_stored_in_bf16_and_train_exactly_as_under_autocast(
        tmp_path, tiny_model_dir, small_chat_file, monkeypatch):
    """LoRA in bf16: frozen linear weights are kept in bf16 (half the memory, no recast at every
    matmul), the LoRA weights and their optimizer state in fp32, and the numbers are those of
    fp32 weights under bf16 autocast."""
    seen = {}
    real_prepare = recipe.make_objective

    def spy(config, model):
        seen["model"] = model
        return real_prepare(config, model)

    monkeypatch.setattr(recipe, "make_objective", spy)
    stored = train(_config(tmp_path, "stored", small_chat_file, tiny_model_dir, "bf16"))
    model = seen["model"]
    frozen = {n: p.dtype for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert frozen["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] \
        == torch.bfloat16
    assert frozen["base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"] \
        == torch.bfloat16
    assert frozen["base_model.model.model.embed_tokens.weight"] == torch.float32  # tied head
    assert frozen["base_model.model.model.norm.weight"] == torch.float32
    assert trained and set(trained.values()) == {torch.float32}

    monkeypatch.setattr(recipe, "frozen_linear_dtype", lambda *args: None)
    recast = train(_config(tmp_path, "recast", small_chat_file, tiny_model_dir, "bf16"))
    assert all(p.dtype == torch.float32 for p in seen["model"].parameters())

    def losses(run):
        return [r.get("train_loss") or r["eval_loss"] for r in map(
            json.loads, (run.run_dir / rundir.METRICS_FILE).read_text().splitlines())]
    # The same roundings: measured equal to ~1e-5 relative after a few steps (each run alone is
    # bit-reproducible; the backward's kernels differ by a summation order).
    assert losses(stored) == pytest.approx(losses(recast), rel=1e-4)
    assert losses(stored)[:3] == losses(recast)[:3]  # before LoRA A moves: bit-identical
