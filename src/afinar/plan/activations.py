"""Memory of one training step, measured on the real architecture without memory.

    probe = probe_activations(config, lora, precision="bf16", seq_len=512, rows=4,
                              target_rows=900, quantization="4bit")
    probe.step_peak_bytes, probe.saved_bytes, probe.checkpointed_bytes()

The model is built on the meta device, given LoRA (or not) and the frozen weights a run would
have (bf16/fp16 for LoRA under mixed precision; 4/8-bit layers stood in for by modules that
compute as bitsandbytes' do), and its parameters are swapped for fake tensors (PyTorch's
FakeTensorMode: tensors that carry shape and dtype, but no storage). Then one training step runs
as the loop runs it: the decoder's forward under the same autocast, the labelled rows picked
out, the fused head and loss of losses/supervised.py, and the backward pass. This is why no formula
per family is needed: whatever transformers' code, autocast and the loss keep, the probe sees.

Two things are counted:
- every tensor autograd saves for the backward pass (once per storage, as the backward pass
  holds it), and the share saved inside each decoder layer: what gradient checkpointing keeps;
- every tensor the step's operations create, from its creation until the last reference to its
  storage goes: the most these hold at once is the step's peak (the activations, autocast's
  casts, the head's chunk of logits, the gradients of the activations in the backward pass and
  the weights' gradients as they accumulate), the number the memory plan uses.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from afinar.models.shape import meta_model

# Decoder layers a probe builds: the others are the same code on the same shapes, and add what
# the middle ones add (a 30-layer model probes in a fifth of the time, the same bytes).
PROBE_LAYERS = 4


@dataclass(frozen=True)
class ActivationProbe:
    """A step over `rows` examples of `seq_len` tokens, `target_rows` of them labelled."""

    seq_len: int
    saved_bytes: int  # everything the backward pass keeps without checkpointing
    per_layer_bytes: list[int]  # the share saved inside each decoder layer
    layer_input_bytes: int  # one layer's input: what checkpointing keeps per layer
    hidden_size: int
    vocab_size: int
    rows: int = 1
    target_rows: int = 0
    # The most that tensors made by the step held at once (forward, loss, backward), and where
    # the step was when they did; 0 when only the forward ran (see probe_activations).
    step_peak_bytes: int = 0
    peak_phase: str = ""
    gradients_bytes: int = 0  # the weights' gradients at the end of the backward pass
    checkpointing: bool = False
    # Different matmuls (operation, shapes, strides) the step runs in each dtype: on a CPU,
    # oneDNN keeps a compiled kernel for every one it meets (plan/memory.py).
    matmuls: dict = None
    quantized: bool = False  # 4/8-bit layers stood in for the frozen linears

    @property
    def outside_layers_bytes(self) -> int:
        return self.saved_bytes - sum(self.per_layer_bytes)

    def checkpointed_bytes(self) -> int:
        """With gradient checkpointing: each layer's input, what lies outside the layers, and
        one layer recomputed at a time during the backward pass."""
        layers = len(self.per_layer_bytes)
        return (self.outside_layers_bytes + layers * self.layer_input_bytes
                + max(self.per_layer_bytes, default=0))


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}


class _LiveBytes(TorchDispatchMode):
    """Bytes held by the storages that operations create (parameters and buffers excluded),
    from their creation until the last tensor on them goes, and the most held at once."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded
        self.live = 0
        self.peak = 0
        self.phase = "forward"
        self.peak_phase = ""
        self._refs: dict[int, weakref.ref] = {}
        self.matmuls: set[tuple] = set()  # the different matmuls the step runs

    def _gone(self, key: int, nbytes: int, _ref) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.matmuls.add((func, str(tensors[-1].dtype),
                              *((tuple(t.shape), tuple(t.stride())) for t in tensors)))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._refs or key in self.excluded:
                continue  # a view, an in-place result, or a weight
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, functools.partial(self._gone, key, nbytes))
            self.live += nbytes
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase
        return out


class _NF4MatMul(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul as it uses memory on a CPU (bitsandbytes 0.50 MatMul4Bit):
    the weight de-quantised to the compute dtype for the product, nothing of the input saved
    (the weight is frozen), and de-quantised again in the backward pass."""

    @staticmethod
    def forward(ctx, x, packed, out_features: int, in_features: int):
        ctx.shape = (out_features, in_features)
        weight = x.new_empty(ctx.shape)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ grad.new_empty(ctx.shape), None, None, None


class _QuantizedLinear(torch.nn.Linear):
    """Stands in for a bitsandbytes 4-bit (or 8-bit) layer in the probe: packed weights, the
    input cast to the compute dtype, the result cast back to the input's dtype and copied, as
    bitsandbytes' Linear4bit and peft's LoRA layer over it do."""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype, bits: int):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = (linear.in_features * linear.out_features * bits + 7) // 8
        self.weight = torch.nn.Parameter(torch.empty(packed, 1, dtype=torch.uint8,
                                                     device="meta"), requires_grad=False)
        self.bias = linear.bias
        self.compute_dtype = compute_dtype

    def forward(self, x):
        dtype = x.dtype
        out = _NF4MatMul.apply(x.to(self.compute_dtype), self.weight, self.out_features,
                               self.in_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(dtype).clone()


def _quantize(model, compute_dtype: torch.dtype, bits: int) -> None:
    from afinar.models.shape import linear_weights

    targets = {id(m) for m in linear_weights(model)}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets:
                setattr(parent, name, _QuantizedLinear(child, compute_dtype, bits))


def _fake_parameters(model, mode) -> None:
    """Replaces every parameter and buffer by a fake CPU tensor of the same shape and dtype.
    Direct assignment: nn.Module._apply cannot swap tensor subclasses that peft holds."""
    with mode:
        fakes: dict[int, torch.nn.Parameter] = {}
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    if id(param) not in fakes:  # tied weights stay one tensor
                        fakes[id(param)] = torch.nn.Parameter(
                            torch.empty(param.shape, dtype=param.dtype),
                            requires_grad=param.requires_grad)
                    module._parameters[name] = fakes[id(param)]
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype)


def probe_activations(config, lora=None, precision: str = "fp32", seq_len: int = 512,
                      frozen_dtype: torch.dtype | None = None, *, rows: int = 1,
                      target_rows: int | None = None, quantization: str = "none",
                      checkpointing: bool = False, step: bool = True) -> ActivationProbe:
    """One training step over `rows` examples of `seq_len` tokens, `target_rows` of them
    labelled (default: all but the first of each), through `config`'s architecture.

    lora: LoraSettings (None for full fine-tuning). frozen_dtype: the dtype the frozen linear
    weights are kept in (bf16/fp16 for LoRA under mixed precision; the compute dtype for 4/8-bit,
    whose layers compute in it), None for fp32. quantization: "4bit"/"8bit" stand bitsandbytes'
    layers in for the frozen linears. checkpointing: each decoder layer recomputed in the
    backward pass, as the loop sets it up. step=False runs the decoder's forward only (the
    saved tensors, no peak).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from afinar.models import adapters
    from afinar.models.shape import linear_weights

    layers_in_model = int(_text_config(config).num_hidden_layers)
    probed_layers = min(layers_in_model, PROBE_LAYERS)
    if probed_layers < layers_in_model:
        config = copy.deepcopy(config)
        text = _text_config(config)
        text.num_hidden_layers = probed_layers
        if isinstance(getattr(text, "layer_types", None), list):
            text.layer_types = text.layer_types[:probed_layers]
    model = meta_model(config)
    if quantization in ("4bit", "8bit"):
        _quantize(model, frozen_dtype or torch.float32, 4 if quantization == "4bit" else 8)
    elif frozen_dtype is not None:
        for module in linear_weights(model):
            module.weight.data = module.weight.data.to(frozen_dtype)
    model = adapters.attach(model, "lora" if lora is not None else "full", lora)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.train()
    if checkpointing and step:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(model, mode)
    decoder = base.get_decoder()
    head = base.get_output_embeddings()
    layers = _decoder_layers(decoder)

    weights = ({p.untyped_storage()._cdata for p in model.parameters()}
               | {b.untyped_storage()._cdata for b in model.buffers()})
    live = _LiveBytes(weights)
    saved: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage -> layer index that saved it first
    current = [-1]
    layer_input = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in weights and key not in saved and live.phase == "forward":
            saved[key] = storage.nbytes()
            owner[key] = current[0]
        return tensor

    entries = [0] * len(layers)  # bytes alive as each layer starts its forward

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            if live.phase == "forward":
                entries[index] = live.live
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None:
                layer_input[0] = hidden.numel() * hidden.element_size() // rows
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    n_targets = rows * (seq_len - 1) if target_rows is None else max(1, target_rows)
    n_targets = min(n_targets, rows * (seq_len - 1))
    grads_bytes = 0
    try:
        with mode, warnings.catch_warnings(), live, \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            warnings.simplefilter("ignore")
            ids = torch.zeros(rows, seq_len, dtype=torch.long)
            # Several rows are padded to the longest: a mask (transformers then builds a 4-D
            # one, and attention expands grouped keys and values). One row has none to mask.
            mask = torch.ones_like(ids) if rows > 1 else None
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False)[0]
            if step:
                live.phase = "loss"
                loss = _supervised_loss(hidden, head, n_targets,
                                        getattr(base.config, "final_logit_softcapping", None))
                del hidden
                live.phase = "backward"
                loss.backward()
                del loss
                grads_bytes = sum(p.grad.untyped_storage().nbytes() for p in model.parameters()
                                  if p.grad is not None)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [0] * len(layers)
    for key, nbytes in saved.items():
        if owner[key] >= 0:
            per_layer[owner[key]] += nbytes
    saved_total, peak = sum(saved.values()), live.peak
    missing = layers_in_model - len(layers)
    if missing > 0:
        # The layers not built keep what the middle ones keep (whatever a layer leaves alive
        # for the backward pass: its saved tensors, or its input under checkpointing), and the
        # step's peak comes after all of them (in the loss or the backward pass).
        middle = per_layer[1:] or per_layer
        per_saved = sum(middle) // len(middle)
        per_live = (entries[-1] - entries[1]) // (len(layers) - 2) if len(layers) > 2 \
            else per_saved
        per_layer += [per_saved] * missing
        saved_total += per_saved * missing
        peak += max(per_live, 0) * missing
    # Per example, as the plan scales them by the batch size.
    per_example = [b // rows for b in per_layer]
    return ActivationProbe(seq_len, saved_total // rows, per_example, layer_input[0],
                           int(_text_config(config).hidden_size), int(_vocab_size(config)),
                           rows, n_targets if step else 0, peak if step else 0,
                           live.peak_phase if step else "", grads_bytes,
                           checkpointing and step, _count_by_dtype(live.matmuls),
                           quantization in ("4bit", "8bit"))


def _count_by_dtype(matmuls: set) -> dict[str, int]:
    """Different matmuls per dtype (the layers not built repeat the built ones' shapes)."""
    counts: dict[str, int] = {}
    for signature in matmuls:
        dtype = signature[1].replace("torch.", "")
        counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def _supervised_loss(hidden, head, n_targets: int, softcap):
    """losses/supervised.py's supervised_ce with the labelled positions given by count (which ones
    a fake tensor cannot know): the rows picked out of the hidden states, the fused head."""
    from afinar.losses.supervised import FusedHeadCrossEntropy

    batch, length = hidden.shape[0], hidden.shape[1] - 1
    # Boolean indexing in the loop: an index of the labelled positions, a copy of those rows.
    first = torch.zeros(n_targets, dtype=torch.long)
    rows = hidden[:, :-1][first % batch, first % length]
    targets = torch.zeros(n_targets, dtype=torch.long)
    weight = head.weight
    if weight.requires_grad:
        # The fused head checks its incoming gradient's values for a trained head, which a fake
        # tensor has none of; its weight's gradient (the size of the weight) is in the plan's
        # gradients part.
        weight = weight.detach()
    row_losses, _ = FusedHeadCrossEntropy.apply(rows, weight, head.bias, targets, None, softcap)
    return row_losses.sum()


def _decoder_layers(decoder) -> list:
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _vocab_size(config) -> int:
    return int(getattr(_text_config(config), "vocab_size"))
