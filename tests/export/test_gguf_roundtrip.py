"""Tiny random models (Llama, Mistral, Qwen2) through afinar's GGUF writer, checked tensor by
tensor against the Hugging Face weights (undoing the Q/K reordering llama.cpp needs), and by
logits computed by real llama.cpp against transformers'."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from afinar.export import gguf_arch
from afinar.export.gguf_write import write_model_gguf
from afinar.export.llama_runner import LlamaCpp
from afinar.models.load import stop_token_ids

TYPES = ("f32", "f16", "bf16", "q8_0")
# Largest error a type may put on a weight, relative to the largest weight of the tensor.
WEIGHT_TOLERANCE = {"f32": 0.0, "f16": 1e-3, "bf16": 8e-3, "q8_0": 1e-2}


def _tiny(arch: str, tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    if arch == "llama":  # untied output, unlike conftest's tiny model, to cover output.weight
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=None,
                                                 tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    with torch.no_grad():  # random init is tiny; bigger weights make the logits informative
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            else:  # norm weights around 1, biases around 0
                p.normal_(1.0 if "norm" in name else 0.0, 0.05)
    return model.eval()


def _gguf_tensors(path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(
            [int(x) for x in reversed(t.shape)])
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", TYPES)
def test_every_tensor_round_trips(tmp_path, tiny_tokenizer, arch, kind):
    import gguf

    model = _tiny(arch, tiny_tokenizer)
    path = tmp_path / f"tiny-{kind}.gguf"
    write_model_gguf(model, tiny_tokenizer, stop_token_ids(tiny_tokenizer, model), path, kind,
                     "tiny")
    tensors = _gguf_tensors(path)
    spec = gguf_arch.arch_for(model.config)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, spec.gguf_arch), 2)
    state = {k: v for k, v in model.state_dict().items()
             if not gguf_arch.skip_tensor(k, model.config)}
    assert len(tensors) == len(state)
    for hf_name, tensor in state.items():
        got = tensors[gguf_arch.gguf_tensor_name(name_map, hf_name)]
        heads = gguf_arch.qk_heads(hf_name, model.config)
        if heads and spec.permute_qk:
            got = gguf_arch.pairs_to_rotary(got, heads)
        want = tensor.float().numpy()
        assert got.shape == want.shape, hf_name
        bound = WEIGHT_TOLERANCE[kind if want.ndim == 2 else "f32"] * np.abs(want).max()
        assert np.abs(got - want).max() <= bound, (hf_name, kind)
    if arch == "qwen2":  # Qwen2 keeps HF's rotary layout and has Q/K/V biases
        assert "blk.0.attn_q.bias" in tensors


def test_metadata_carries_the_trained_chat_format(tmp_path, tiny_tokenizer):
    import gguf

    model = _tiny("llama", tiny_tokenizer)
    path = tmp_path / "tiny.gguf"
    write_model_gguf(model, tiny_tokenizer, stop_token_ids(tiny_tokenizer, model), path, "f16",
                     "tiny", {"afinar.run": "r1"})
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama"
    assert value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 16
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "gpt-2"  # the fixture's pre-tokenizer is plain ByteLevel
    assert value("tokenizer.chat_template") == tiny_tokenizer.chat_template
    assert value("tokenizer.ggml.eos_token_id") == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert value("tokenizer.ggml.add_bos_token") is False
    tokens = value("tokenizer.ggml.tokens")
    assert len(tokens) == len(tiny_tokenizer)
    types = value("tokenizer.ggml.token_type")
    assert types[tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")] == 3  # control token
    assert value("afinar.run") == "r1"


# Logits of llama.cpp against transformers on the same ids; bounds are on the largest absolute
# difference, relative to the spread of the logits.
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 5e-2}  # measured: 3e-4, 6e-4, 5e-3, 2e-2


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", TYPES)
def test_llama_cpp_logits_match_transformers(tmp_path, tiny_tokenizer, arch, kind):
    model = _tiny(arch, tiny_tokenizer, seed=1)
    path = tmp_path / f"tiny-{kind}.gguf"
    write_model_gguf(model, tiny_tokenizer, stop_token_ids(tiny_tokenizer, model), path, kind,
                     "tiny")
    text = "<|im_start|>user\nHola, pedido 123 llegó roto<|im_end|>\n<|im_start|>assistant\n"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(path, logits_all=True) as llm:
        assert llm.tokenize(text) == ids
        got = llm.logits(ids)
    spread = want.max() - want.min()
    error = np.abs(got - want).max() / spread
    print(f"{arch} {kind}: max logit error {error:.2e} of the spread")
    assert error < LOGIT_TOLERANCE[kind]
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= (1.0 if kind == "f32" else 0.9)


def test_forgetting_the_qk_reordering_is_caught_by_logits(tmp_path, tiny_tokenizer, monkeypatch):
    """The classic converter bug: without the reordering llama.cpp's rotary embedding garbles
    attention. This shows the logit test above would notice it."""
    model = _tiny("llama", tiny_tokenizer, seed=1)
    monkeypatch.setattr(gguf_arch, "rotary_to_pairs", lambda rows, heads: rows)
    path = tmp_path / "broken.gguf"
    write_model_gguf(model, tiny_tokenizer, stop_token_ids(tiny_tokenizer, model), path, "f32",
                     "tiny")
    ids = tiny_tokenizer("pedido 123 llegó roto hoy por la tarde", add_special_tokens=False)[
        "input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(path, logits_all=True) as llm:
        got = llm.logits(ids)
    assert np.abs(got - want).max() / (want.max() - want.min()) > LOGIT_TOLERANCE["f32"] * 10


def test_a_sliding_window_shorter_than_the_context_is_refused_clearly():
    from transformers import MistralConfig, Qwen2Config

    from afinar.errors import AfinarError

    with pytest.raises(AfinarError, match="last 16 tokens") as caught:
        gguf_arch.arch_for(MistralConfig(sliding_window=16, max_position_embeddings=512))
    assert "--to merged" in caught.value.hint
    assert gguf_arch.arch_for(MistralConfig(sliding_window=None)).gguf_arch == "LLAMA"
    assert gguf_arch.arch_for(Qwen2Config()).gguf_arch == "QWEN2"  # window off by default
    with pytest.raises(AfinarError, match="sliding-window"):
        gguf_arch.arch_for(Qwen2Config(use_sliding_window=True, sliding_window=16,
                                       num_hidden_layers=4, max_window_layers=2))
