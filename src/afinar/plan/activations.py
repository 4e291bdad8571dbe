"""Activation memory of one training forward, measured on the real architecture without memory.

    per_example = probe_activations(config, lora, precision="bf16", seq_len=512)

The model is built on the meta device, given LoRA (or not) and the frozen-weight dtypes a run
would use, and its parameters are swapped for fake tensors (PyTorch's FakeTensorMode: CPU tensors
that carry shape and dtype, but no storage). One forward of the decoder then runs the real code
of the family (attention implementation, norms, rotary, autocast casts) and every tensor autograd
saves for the backward pass is counted once per storage, as the backward pass will hold it. This
is why no formula per family is needed: whatever transformers' code keeps, the probe sees.

The loss part (the output head, applied in checkpointed chunks to labelled positions only; see
train/losses.py) is computed from its shape: it has data-dependent sizes a fake forward cannot run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from afinar.models.shape import meta_model


@dataclass(frozen=True)
class ActivationProbe:
    """Bytes for ONE example of `seq_len` tokens (activations grow linearly with batch size)."""

    seq_len: int
    saved_bytes: int  # everything the backward pass keeps without checkpointing
    per_layer_bytes: list[int]  # the share saved inside each decoder layer
    layer_input_bytes: int  # one layer's input: what checkpointing keeps per layer
    hidden_size: int
    vocab_size: int

    @property
    def outside_layers_bytes(self) -> int:
        return self.saved_bytes - sum(self.per_layer_bytes)

    def checkpointed_bytes(self) -> int:
        """With gradient checkpointing: each layer's input, what lies outside the layers, and
        one layer recomputed at a time during the backward pass."""
        layers = len(self.per_layer_bytes)
        return (self.outside_layers_bytes + layers * self.layer_input_bytes
                + max(self.per_layer_bytes, default=0))


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
                      frozen_dtype: torch.dtype | None = None) -> ActivationProbe:
    """One example of `seq_len` tokens through the decoder of `config`'s architecture.

    lora: LoraSettings (None for full fine-tuning). frozen_dtype: the dtype the frozen linear
    weights are kept in (bf16/fp16 for LoRA under mixed precision, and for 4/8-bit, whose
    layers dequantise to the compute dtype), None for fp32.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from afinar.models import adapters
    from afinar.models.shape import linear_weights

    model = meta_model(config)
    if frozen_dtype is not None:
        for module in linear_weights(model):
            module.weight.data = module.weight.data.to(frozen_dtype)
    model = adapters.attach(model, "lora" if lora is not None else "full", lora)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_parameters(model, mode)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = _decoder_layers(decoder)

    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}
    owner: dict[int, int] = {}  # storage -> layer index that saved it first
    current = [-1]
    layer_input = [0]

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in saved:
            saved[key] = storage.nbytes()
            owner[key] = current[0]
        return tensor

    def enter(index):
        def hook(module, args, kwargs):
            current[0] = index
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is not None:
                layer_input[0] = hidden.numel() * hidden.element_size()
        return hook

    def leave(module, args, output):
        current[0] = -1

    handles = [layer.register_forward_pre_hook(enter(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave) for layer in layers]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    try:
        with mode, warnings.catch_warnings(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            warnings.simplefilter("ignore")
            ids = torch.zeros(1, seq_len, dtype=torch.long)
            decoder(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = [0] * len(layers)
    for key, nbytes in saved.items():
        if owner[key] >= 0:
            per_layer[owner[key]] += nbytes
    return ActivationProbe(seq_len, sum(saved.values()), per_layer, layer_input[0],
                           int(config.hidden_size), int(_vocab_size(config)))


def _decoder_layers(decoder) -> list:
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def _vocab_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size"))
