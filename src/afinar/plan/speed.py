"""What a training step costs on this machine, measured by running one, and the precision that
makes it cheapest.

    probes = probe_steps(model_config, config, ("fp32", "bf16"), rows=4, seq_len=160)
    probes["bf16"].layer_seconds, .outside_seconds, .optimizer_seconds, .step_seconds(layers)
    choice = choose_precision(config, model_config, device, lengths, targets)
    choice.precision, choice.reason

A bare matmul says little about a training step on a CPU: casts under autocast, attention,
norms, LoRA's small matmuls, the fused head and the optimizer take their share, and that share
differs by dtype (measured on an AVX512-BF16 EPYC: bf16 matmuls 1.9x fp32, a bf16 step 1.3x).
So the probe runs what the loop runs: the model's own architecture with two decoder layers of
its real shape (random weights), frozen weights stored as the run stores them (bf16 for LoRA
under bf16, 4/8-bit bitsandbytes layers when quantised), LoRA or full training attached the
same way, the same fused-head loss under the same autocast, the backward pass, gradient
clipping and AdamW. Hooks time the second decoder layer's forward and backward alone (on a CPU
autograd runs on the calling thread, so wall-clock marks are exact); the rest of the step
(embeddings, head and loss) and the optimizer are timed apart, so each part scales by what it
scales with: layers by tokens, the head by labelled tokens, the optimizer by trained weights.

The probe runs eagerly. Compiled layers (train/compiled.py) and eager runs that return freed
memory to the OS (train/host_memory.py) run at other speeds; `planner.cpu_speed` converts, with the
ratios measured on the embedded model (bench/bench_plan.py prints planned against measured).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch

from afinar.errors import AfinarError

PROBE_LAYERS = 2
# Rows x length of the probe's batch stay under this, and one layer's forward+backward under
# PROBE_LAYER_FLOPS: a plan must not cost a noticeable share of a run (about 2-5 s on the
# embedded model on 2 cores, both precisions).
MAX_PROBE_TOKENS = 1024
MIN_PROBE_TOKENS = 64
PROBE_LAYER_FLOPS = 4e10
# Vocabularies above this are probed with a head of this many rows and scaled (the head's work
# is linear in the vocabulary); keeps a 128k-vocabulary probe's memory small.
MAX_PROBE_VOCAB = 65536
# The fastest of this many timed steps per precision. Measured on the quiet 2-core EPYC (the
# embedded model, 2 x 128 tokens, the probe run 4 times in a row): with 3 steps the whole-model
# step came out at 1.25-2.09 s in fp32 and 0.89-1.22 s in bf16; with 8, 1.07-1.22 s and
# 0.74-0.78 s. Costs about 5 s on the embedded model, both precisions.
TIMED_STEPS = 8
# bf16 must beat fp32 by this much to be chosen: fp32 is the exact reference, bf16 changes the
# numbers, and a smaller difference is within the noise of a short probe.
BF16_MARGIN = 0.10
# Part of the cache key: raise it when afinar's step changes speed (a measurement of the old
# code would otherwise keep deciding). 3: probes measured while other processes were busy are
# no longer cached (version 2's cache may hold such slow ones); 4: 8 timed steps, not 3.
PROBE_VERSION = 4
# A probe during which other processes kept this many cores busy (on average) is used for the
# run at hand but not cached: it measured a shared machine, and the next run measures again.
# Measured on the 2-core EPYC: one other busy process made a cached fp32 probe 1.9x slow, and
# the plan of every later run 1.7x slow with it.
CONTENDED_CORES = 0.25


@dataclass(frozen=True)
class StepProbe:
    """Seconds measured for one eager step on `rows` x `seq_len` tokens, `labelled` of them with a
    label, `trainable` weights trained, in `precision`."""

    precision: str
    rows: int
    seq_len: int
    labelled: int
    trainable: int
    layer_seconds: float  # one decoder layer, forward and backward
    layer_forward_seconds: float  # one decoder layer, forward only
    outside_seconds: float  # embeddings, head, loss and their backward
    optimizer_seconds: float  # clipping, AdamW, zeroing the gradients
    vocab_scale: float = 1.0  # real vocabulary / probed vocabulary
    # Cores other processes kept busy, on average, while the probe ran (0 where unknown).
    others_cores: float = 0.0

    @property
    def contended(self) -> bool:
        return self.others_cores >= CONTENDED_CORES

    @property
    def tokens(self) -> int:
        return self.rows * self.seq_len

    def step_seconds(self, layers: int) -> float:
        return (layers * self.layer_seconds + self.outside_seconds * self.vocab_scale
                + self.optimizer_seconds)


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str
    measured: dict  # precision -> seconds of a probed step of the whole model (eager)
    probes: dict  # precision -> StepProbe


def _text_config(model_config):
    return model_config.get_text_config() if hasattr(model_config, "get_text_config") \
        else model_config


def _probe_config(model_config, vocab: int):
    """`model_config` with two decoder layers (the per-layer lists cut to match)."""
    probe = copy.deepcopy(model_config)
    text = _text_config(probe)
    layers = int(text.num_hidden_layers)
    text.num_hidden_layers = min(PROBE_LAYERS, layers)
    for name in ("layer_types", "sliding_window_pattern_list"):
        value = getattr(text, name, None)
        if isinstance(value, list) and len(value) == layers:
            setattr(text, name, value[:PROBE_LAYERS])
    text.vocab_size = vocab
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value >= vocab:
            setattr(text, name, 0)
    return probe


def _layer_params(model_config) -> int:
    text = _text_config(model_config)
    h, i = int(text.hidden_size), int(getattr(text, "intermediate_size", 4 * text.hidden_size))
    heads = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    return h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * i


def probe_shape(model_config, batch_size: int, lengths: list[int]) -> tuple[int, int]:
    """(rows, length) of the probe's batch: the run's batch size at its median length, made
    smaller where one layer's step would take long (large models on a CPU)."""
    seq = max(8, int(statistics.median(lengths))) if lengths else 128
    rows = max(1, batch_size)
    budget = max(MIN_PROBE_TOKENS, min(MAX_PROBE_TOKENS,
                                       int(PROBE_LAYER_FLOPS / (6 * _layer_params(model_config)))))
    while rows > 1 and rows * seq > budget:
        rows -= 1
    seq = min(seq, max(8, budget // rows))
    return rows, seq


def _quantize_linears(model, quantization: str, compute_dtype) -> None:
    """The frozen linear layers as bitsandbytes layers, as load_quantized would hold them."""
    from afinar.models.quantize import require_bitsandbytes
    from afinar.models.shape import linear_weights

    bnb = require_bitsandbytes()
    targets = {id(m) for m in linear_weights(model)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) not in targets:
                continue
            weight = child.weight.data
            if quantization == "4bit":
                layer = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                          bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4",
                                          compress_statistics=True, device="meta")
                layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype), requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True)
                layer.support_avx512bf16_for_cpu = False  # as load_quantized sets it
            else:
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features,
                                            bias=child.bias is not None, has_fp16_weights=False,
                                            device="meta")
                layer.weight = bnb.nn.Int8Params(weight.half(), requires_grad=False,
                                                 has_fp16_weights=False)
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to("cpu"))


def _build_probe_model(model_config, config, precision: str, vocab: int):
    from transformers import AutoModelForCausalLM

    from afinar.models import adapters
    from afinar.models.load import COMPUTE_DTYPES, frozen_linear_dtype
    from afinar.models.shape import linear_weights

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(_probe_config(model_config, vocab),
                                                 dtype=torch.float32)
    compute = COMPUTE_DTYPES.get(precision, torch.float32)
    if config.quantization != "none":
        _quantize_linears(model, config.quantization, compute)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    else:
        frozen = frozen_linear_dtype(config.method, config.lora.dora, precision)
        if frozen is not None:
            for module in linear_weights(model):
                module.weight.data = module.weight.data.to(frozen)
    model = adapters.attach(model, config.method, config.lora)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    return model


def _decoder_layers(model) -> list:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    return list(layers) if layers is not None else []


class _LayerClock:
    """Wall-clock marks around one decoder layer's forward and backward."""

    def __init__(self, layer):
        self.forward = self.backward = 0.0
        self._marks: dict = {}
        self._handles = [layer.register_forward_pre_hook(self._enter, with_kwargs=True),
                         layer.register_forward_hook(self._leave)]

    def _enter(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self._marks["start"] = time.perf_counter()
        if torch.is_tensor(hidden) and hidden.requires_grad:
            # Runs when the gradient of the layer's input is ready: its backward is over.
            hidden.register_hook(self._backward_done)

    def _leave(self, module, args, output):
        self.forward += time.perf_counter() - self._marks.pop("start")
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if torch.is_tensor(hidden) and hidden.requires_grad:
            hidden.register_hook(self._backward_start)

    def _backward_start(self, grad):
        self._marks["backward"] = time.perf_counter()

    def _backward_done(self, grad):
        if "backward" in self._marks:
            self.backward += time.perf_counter() - self._marks.pop("backward")

    def reset(self):
        self.forward = self.backward = 0.0

    def close(self):
        for handle in self._handles:
            handle.remove()


class _ProbeRun:
    """The probe model of one precision, ready to time steps (see the module docstring)."""

    def __init__(self, model_config, config, precision: str, rows: int, seq_len: int):
        from afinar.losses.supervised import SupervisedLoss

        vocab = int(_text_config(model_config).vocab_size)
        self.probe_vocab = min(vocab, MAX_PROBE_VOCAB)
        self.vocab_scale = vocab / self.probe_vocab
        self.precision = precision
        model = _build_probe_model(model_config, config, precision, self.probe_vocab)
        self.layers = _decoder_layers(model)
        if len(self.layers) < PROBE_LAYERS:
            raise AfinarError("the speed probe found no decoder layers in this architecture")
        self.clock = _LayerClock(self.layers[-1])
        self.module = SupervisedLoss(model)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-5)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.probe_vocab, (rows, seq_len), generator=generator)
        labels = ids.clone()
        labels[:, : seq_len // 2] = -100  # about half the positions labelled, as chat data
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        self.rows, self.seq_len = rows, seq_len
        self.labelled = int((labels[:, 1:] != -100).sum())
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.times: list[tuple[float, float, float, float]] = []

    def step(self, record: bool = True) -> None:
        self.clock.reset()
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=self.dtype or torch.bfloat16,
                            enabled=self.dtype is not None):
            loss_sum, count, _ = self.module(**self.batch)
            (loss_sum / count).backward()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if record:
            self.times.append((backward_done - started, time.perf_counter() - backward_done,
                               self.clock.forward + self.clock.backward, self.clock.forward))

    def result(self) -> StepProbe:
        """The fastest timed step: another process on the same cores only ever slows a step,
        so the minimum is the closest to what this machine does alone."""
        self.clock.close()
        forward_backward, optimizer, layer, forward = min(self.times)
        return StepProbe(self.precision, self.rows, self.seq_len, self.labelled,
                         sum(p.numel() for p in self.trainable), layer, forward,
                         max(0.0, forward_backward - len(self.layers) * layer), optimizer,
                         self.vocab_scale)


def probe_steps(model_config, config, precisions, rows: int, seq_len: int) -> dict:
    """{precision: StepProbe}: eager training steps of `model_config`'s architecture with two
    real-shaped decoder layers, timed by part. The precisions take turns step by step, so a
    burst of other work on the machine falls on both alike."""
    runs = [_ProbeRun(model_config, config, p, rows, seq_len) for p in precisions]
    for run in runs:
        run.step(record=False)  # the first step pays one-time set-up
    others = _OtherProcesses()
    for _ in range(TIMED_STEPS):
        for run in runs:
            run.step()
    busy = others.cores()
    results = {run.precision: replace(run.result(), others_cores=busy) for run in runs}
    del runs
    _give_back_memory()
    return results


class _OtherProcesses:
    """Cores the rest of the machine keeps busy, on average, from now until `cores()`: the
    whole machine's busy time (/proc/stat) less this process's own CPU time. 0 where /proc is
    not there."""

    def __init__(self):
        self.started = (time.perf_counter(), time.process_time(), _machine_busy_seconds())

    def cores(self) -> float:
        wall0, own0, busy0 = self.started
        busy = _machine_busy_seconds()
        if busy is None or busy0 is None:
            return 0.0
        wall = time.perf_counter() - wall0
        others = (busy - busy0) - (time.process_time() - own0)
        return round(max(0.0, others) / wall, 2) if wall > 0 else 0.0


def _machine_busy_seconds() -> float | None:
    """CPU seconds every core has spent busy since boot (all but idle and I/O wait)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _give_back_memory() -> None:
    """The probe models' memory back to the OS, so that the plan's measure of this process's
    own memory (plan/run.py) does not count them."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


# --- the precision `auto` picks on a CPU -----------------------------------------------------

def _cache_path():
    from afinar.paths import afinar_home

    return afinar_home() / "speed-probes.json"


def _machine_key(model_config, config, rows: int, seq_len: int) -> str:
    """What a probe's result depends on: this CPU, torch, the layer's shape and the method."""
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        lines = []
    cpu = next((line for line in lines if line.startswith("model name")), "")
    flags = next((line for line in lines if line.startswith("flags")), "")
    text = _text_config(model_config)
    shape = {k: getattr(text, k, None) for k in (
        "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
        "num_key_value_heads", "head_dim", "vocab_size", "num_hidden_layers")}
    parts = [str(PROBE_VERSION), cpu, flags, torch.__version__, str(torch.get_num_threads()), json.dumps(shape),
             config.method, config.quantization, json.dumps(config.lora.model_dump(mode="json")),
             f"{rows}x{seq_len}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def _read_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    from afinar.rundir import write_json_atomic

    try:
        path = _cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache)
    except OSError:
        pass  # a read-only home costs a probe next time, nothing else


def decide(measured: dict) -> tuple[str, str]:
    """(precision, reason) from measured seconds per step, fp32 and bf16."""
    fp32, bf16 = measured["fp32"], measured["bf16"]
    ratio = fp32 / bf16 if bf16 > 0 else 0.0
    timing = f"a probed step took {bf16:.2f} s in bf16, {fp32:.2f} s in fp32"
    if ratio >= 1 + BF16_MARGIN:
        return "bf16", f"precision auto: bf16, {ratio:.2f}x fp32's speed on this CPU ({timing})"
    why = ("not faster by the " f"{BF16_MARGIN:.0%} that would pay for its rounding" if ratio >= 1
           else f"{1 / ratio:.2f}x slower" if ratio > 0 else "not measurable")
    return "fp32", f"precision auto: fp32, bf16 is {why} on this CPU ({timing})"


def choose_precision(config, model_config, device, lengths: list[int]) -> PrecisionChoice:
    """`config.precision` resolved for `device`: on a CPU, `auto` runs the step probe in fp32
    and bf16 and keeps the faster (bf16 only when it is at least BF16_MARGIN faster). The
    measurement is cached per CPU, torch version, layer shape and method in AFINAR_HOME."""
    from afinar.models.load import pick_precision

    requested = config.precision
    if requested != "auto" or device.type != "cpu":
        precision = pick_precision(requested, device)
        why = (f"precision {precision} (as configured)" if requested != "auto"
               else f"precision auto: {precision} on {device.type}")
        return PrecisionChoice(precision, why, {}, {})
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each process would time its own probe on cores the others share, and could decide
        # otherwise than they do: every rank decides by the CPU's flags instead.
        precision = pick_precision(requested, device)
        return PrecisionChoice(precision, f"precision auto: {precision}, by the CPU's bf16 "
                               "flags (several processes: a step cannot be timed alone)", {}, {})
    text = _text_config(model_config)
    rows, seq = probe_shape(model_config, config.batch_size, lengths)
    key = _machine_key(model_config, config, rows, seq)
    cache = _read_cache()
    probes = {}
    if key in cache and set(cache[key]) >= {"fp32", "bf16"}:
        probes = {p: StepProbe(**v) for p, v in cache[key].items()}
    else:
        try:
            probes = probe_steps(model_config, config, ("fp32", "bf16"), rows, seq)
        except Exception as exc:  # an architecture the probe cannot build must not stop a run
            precision = pick_precision(requested, device)
            return PrecisionChoice(precision, f"precision auto: {precision}, by the CPU's bf16 "
                                   f"flags (the step probe failed: {type(exc).__name__}: "
                                   f"{str(exc)[:200]})", {}, {})
        if not any(p.contended for p in probes.values()):
            cache[key] = {p: asdict(v) for p, v in probes.items()}
            _write_cache(cache)
    layers = int(text.num_hidden_layers)
    measured = {p: round(v.step_seconds(layers), 4) for p, v in probes.items()}
    precision, reason = decide(measured)
    busy = max(p.others_cores for p in probes.values())
    if busy >= CONTENDED_CORES:
        reason += (f"; measured while other processes kept {busy:.1f} cores busy, so not "
                   "cached: the next run measures again")
    return PrecisionChoice(precision, reason, measured, probes)


def probe_for(config, model_config, precision: str, lengths: list[int]) -> StepProbe | None:
    """The step probe of `precision` for this run (from the cache when `choose_precision` or an
    earlier run measured it); None when the probe cannot run this architecture."""
    rows, seq = probe_shape(model_config, config.batch_size, lengths)
    key = _machine_key(model_config, config, rows, seq)
    cache = _read_cache()
    if precision in cache.get(key, {}):
        return StepProbe(**cache[key][precision])
    try:
        probe = probe_steps(model_config, config, (precision,), rows, seq)[precision]
    except Exception:  # the plan then times the run from the matmul peak, as for a GPU
        return None
    if not probe.contended:
        cache.setdefault(key, {})[precision] = asdict(probe)
        _write_cache(cache)
    return probe
