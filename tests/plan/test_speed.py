"""The step probe (plan/speed.py): a real training step of the model's architecture, timed by
part; `precision: auto` on a CPU keeps the faster precision it measured; the plan's time comes
from it on this machine.

Which precision wins depends on the CPU (bf16 is about 3x slower than fp32 without native bf16,
1.3-1.6x faster with AVX512-BF16, more with AMX): these tests assert the rule that links the
measurement to the choice, which holds on every kind, never which precision a kind gets.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig

from afinar import rundir
from afinar.config import TrainConfig
from afinar.plan import speed
from afinar.plan.planner import PlanData, make_plan
from afinar.plan.hardware import Target


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AFINAR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _config(tiny_model_dir, **settings) -> TrainConfig:
    return TrainConfig(data="x.jsonl", model=str(tiny_model_dir), **settings)


def test_the_probe_times_every_part_of_a_real_step(tiny_model_dir):
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir)
    probes = speed.probe_steps(model_config, config, ("fp32", "bf16"), rows=2, seq_len=24)
    assert set(probes) == {"fp32", "bf16"}
    for precision, probe in probes.items():
        assert probe.precision == precision
        assert (probe.rows, probe.seq_len, probe.tokens) == (2, 24, 48)
        assert probe.labelled == 2 * 12  # the second half of each row carries labels
        for part in (probe.layer_seconds, probe.layer_forward_seconds, probe.outside_seconds,
                     probe.optimizer_seconds):
            assert math.isfinite(part) and part >= 0
        assert 0 < probe.layer_forward_seconds < probe.layer_seconds  # forward + backward
        # LoRA on the two probed layers is what trains: r x (in + out) per adapted matrix.
        lora_weights = sum(p.numel() for n, p in _probe_model(model_config, config, precision)
                           .named_parameters() if p.requires_grad)
        assert probe.trainable == lora_weights
        layers = model_config.num_hidden_layers
        assert probe.step_seconds(layers + 4) > probe.step_seconds(layers)


def _probe_model(model_config, config, precision):
    return speed._build_probe_model(model_config, config, precision,
                                    model_config.vocab_size)


def test_the_probe_model_is_stored_as_the_run_stores_it(tiny_model_dir):
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    lora_bf16 = _probe_model(model_config, _config(tiny_model_dir), "bf16")
    frozen = {p.dtype for n, p in lora_bf16.named_parameters()
              if not p.requires_grad and "proj" in n}
    assert frozen == {torch.bfloat16}  # LoRA under bf16 keeps frozen linears in bf16
    assert len(speed._decoder_layers(lora_bf16)) == speed.PROBE_LAYERS
    full = _probe_model(model_config, _config(tiny_model_dir, method="full"), "bf16")
    assert all(p.requires_grad and p.dtype == torch.float32 for p in full.parameters())
    qlora = _probe_model(model_config, _config(tiny_model_dir, quantization="4bit"), "fp32")
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qlora.modules())
    # and a 4-bit step runs, in both compute dtypes
    probes = speed.probe_steps(model_config, _config(tiny_model_dir, quantization="4bit"),
                               ("fp32", "bf16"), rows=2, seq_len=16)
    assert all(p.layer_seconds > 0 and p.trainable > 0 for p in probes.values())


@pytest.mark.parametrize("fp32, bf16, expected", [
    (2.0, 1.0, "bf16"),     # bf16 twice as fast (AVX512-BF16 / AMX)
    (1.0, 3.0, "fp32"),     # emulated bf16, three times slower
    (1.05, 1.0, "fp32"),    # 5% faster does not pay for bf16's rounding
    (1.2, 1.0, "bf16"),
])
def test_bf16_is_chosen_only_when_it_is_measurably_faster(fp32, bf16, expected):
    precision, reason = speed.decide({"fp32": fp32, "bf16": bf16})
    assert precision == expected
    assert reason.startswith(f"precision auto: {expected}")
    assert f"{bf16:.2f} s in bf16" in reason and f"{fp32:.2f} s in fp32" in reason


def test_auto_measures_both_precisions_once_per_machine_and_model(tiny_model_dir, home,
                                                                   monkeypatch):
    # A probe is cached only when the machine was quiet: this test is about the cache, so the
    # machine counts as quiet whatever else runs (the rule has a test of its own below).
    monkeypatch.setattr(speed._OtherProcesses, "cores", lambda self: 0.0)
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir, batch_size=2)
    choice = speed.choose_precision(config, model_config, torch.device("cpu"), [30] * 8)
    assert set(choice.measured) == {"fp32", "bf16"}
    assert choice.precision == speed.decide(choice.measured)[0]
    assert choice.reason == speed.decide(choice.measured)[1]
    cached = json.loads((home / "speed-probes.json").read_text())
    assert len(cached) == 1 and set(next(iter(cached.values()))) == {"fp32", "bf16"}

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again although this machine and model were measured")

    monkeypatch.setattr(speed, "probe_steps", no_probe)
    again = speed.choose_precision(config, model_config, torch.device("cpu"), [30] * 8)
    assert (again.precision, again.measured) == (choice.precision, choice.measured)
    # The plan's time reads the same cache.
    assert speed.probe_for(config, model_config, choice.precision, [30] * 8) \
        == choice.probes[choice.precision]


def test_a_probe_measured_beside_busy_processes_decides_this_run_but_is_not_cached(
        tiny_model_dir, home, monkeypatch):
    monkeypatch.setattr(speed._OtherProcesses, "cores", lambda self: 1.0)
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir, batch_size=2)
    choice = speed.choose_precision(config, model_config, torch.device("cpu"), [30] * 8)
    assert choice.precision == speed.decide(choice.measured)[0]
    assert "other processes kept 1.0 cores busy" in choice.reason
    assert not (home / "speed-probes.json").exists()
    assert speed.probe_for(config, model_config, "fp32", [30] * 8).contended
    assert not (home / "speed-probes.json").exists()


def test_other_processes_cpu_time_is_counted_and_ours_is_not():
    """A real busy child process shows as about a core more than before; this process's own
    busy loop adds nothing. Relative to what the machine was doing just before, so that other
    work on it (the probe's purpose is to notice it) does not fail the test."""
    import subprocess
    import sys
    import time

    def others_while(work) -> float:
        others = speed._OtherProcesses()
        work()
        return others.cores()

    def spin():
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            pass

    idle = others_while(lambda: time.sleep(0.5))
    assert others_while(spin) < idle + 0.5  # our own CPU time is subtracted
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        assert others_while(lambda: time.sleep(1.0)) >= idle + 0.4
    finally:
        child.kill()
        child.wait()


def test_explicit_precision_and_several_processes_are_not_probed(tiny_model_dir, home,
                                                                 monkeypatch):
    model_config = AutoConfig.from_pretrained(tiny_model_dir)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed a run whose precision was not measured")

    monkeypatch.setattr(speed, "probe_steps", no_probe)
    for precision in ("fp32", "bf16"):
        choice = speed.choose_precision(_config(tiny_model_dir, precision=precision),
                                        model_config, torch.device("cpu"), [30])
        assert (choice.precision, choice.measured) == (precision, {})
        assert "as configured" in choice.reason
    monkeypatch.setenv("WORLD_SIZE", "2")
    from afinar.models.load import cpu_has_fast_bf16

    choice = speed.choose_precision(_config(tiny_model_dir), model_config,
                                    torch.device("cpu"), [30])
    assert choice.precision == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert "flags" in choice.reason


def test_the_probe_shape_stays_small_for_large_models():
    from transformers import LlamaConfig

    small = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                        num_key_value_heads=3, num_hidden_layers=30)
    assert speed.probe_shape(small, 4, [150] * 9) == (4, 150)
    assert speed.probe_shape(small, 16, [500] * 9)[0] * speed.probe_shape(small, 16, [500] * 9)[1] \
        <= speed.MAX_PROBE_TOKENS
    eight_b = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, num_hidden_layers=32)
    rows, seq = speed.probe_shape(eight_b, 4, [512] * 9)
    assert speed.MIN_PROBE_TOKENS // 2 <= rows * seq <= max(speed.MIN_PROBE_TOKENS, 64)


def _cpu_plan(tiny_model_dir, probe, compiled=False, **settings):
    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    config = _config(tiny_model_dir, **settings)
    data = PlanData(lengths=[40] * 16, targets=[20] * 16, epochs=2, held_out_tokens=160,
                    evaluations=3)
    target = Target("this CPU", "cpu", 2**34, 0.1, True)
    return make_plan(config, model_config, data, target, "fp32", 2**34, 0, speed=probe,
                     compiled=compiled)


def test_the_plan_times_a_cpu_run_from_the_probe(tiny_model_dir):
    probe = speed.StepProbe("fp32", rows=4, seq_len=40, labelled=80, trainable=1000,
                            layer_seconds=0.02, layer_forward_seconds=0.008,
                            outside_seconds=0.05, optimizer_seconds=0.001)
    layers = AutoConfig.from_pretrained(tiny_model_dir).num_hidden_layers
    eager = _cpu_plan(tiny_model_dir, probe, batch_size=4)
    t = eager.time
    assert "measured here" in t["throughput_source"] and t["compiled"] is False
    # 16 examples of 40 tokens, 4 a batch, the probe's own shape: 4 steps an epoch, each
    # (layers x layer + head part x labelled share + optimizer x trained share) / eager speed.
    trained = eager.model["trainable_parameters"]
    per_step = (layers * 0.02 + 0.05 * (80 / 80) + 0.001 * trained / 1000)
    from afinar.plan import planner

    eager_speed = planner.cpu_speed("fp32", compiled=False, quantized=False)
    assert t["train_seconds"] == pytest.approx(2 * 4 * per_step / eager_speed, abs=0.05)
    compiled = _cpu_plan(tiny_model_dir, probe, compiled=True, batch_size=4).time
    assert compiled["compiled"] is True
    assert compiled["train_seconds"] == pytest.approx(
        2 * 4 * per_step / planner.cpu_speed("fp32", compiled=True, quantized=False)
        + planner.COMPILE_SECONDS, rel=0.01)
    recompute = _cpu_plan(tiny_model_dir, probe, batch_size=4, gradient_checkpointing=True)
    assert recompute.time["train_seconds"] > t["train_seconds"]  # forwards run twice
    assert t["eval_seconds"] > 0


def test_a_run_records_what_auto_chose_and_why(tmp_path, tiny_model_dir, small_chat_file):
    from afinar.train.recipe import train

    events = []
    result = train(TrainConfig(data=str(small_chat_file), model=str(tiny_model_dir),
                               output=str(tmp_path / "run"), max_steps=2, evaluate=False,
                               batch_size=2), on_event=events.append)
    info = json.loads((result.run_dir / rundir.RUN_FILE).read_text())
    measured = info["precision_probe_seconds"]
    assert info["precision"] == speed.decide(measured)[0]
    # (a probe measured beside busy processes says so after the reason)
    assert info["precision_reason"].startswith(speed.decide(measured)[1])
    logged = [e["message"] for e in events if e["type"] == "log"]
    assert info["precision_reason"] in logged
    plan = json.loads((result.run_dir / rundir.PLAN_FILE).read_text())
    assert "measured here" in plan["time"]["throughput_source"]
    assert plan["precision"] == info["precision"]
