"""What llama.cpp cannot run is refused before conversion, clearly (llama_cpp_limits.py); rsLoRA
is rescaled so that the real converter's adapter, applied by real llama.cpp, gives the PEFT
model's logits. Also the pre-tokenizer names afinar reads from tokenizer.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from afinar.errors import AfinarError
from afinar.export.convert import convert_adapter, convert_model
from afinar.export.llama_cpp_limits import adapter_for_llama_cpp, check_model_config
from afinar.export.llama_runner import LlamaCpp
from afinar.export.merged import write_hf_folder
from afinar.export.pre_tokenizer import pre_tokenizer_name
from afinar.models.load import stop_token_ids

PROMPT = "<|im_start|>user\npedido 123 llegó roto<|im_end|>\n<|im_start|>assistant\n"


def _base(tokenizer, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.05 if p.ndim == 1 else 0.08)
    return model.eval()


def _adapter(tmp_path, tokenizer, tied: bool = False, **lora):
    """A PEFT adapter on the tiny base, saved; its B matrices random (PEFT starts them at 0)."""
    from peft import LoraConfig, get_peft_model

    base = _base(tokenizer, tied)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj",
                                                             "o_proj", "down_proj"], **lora}
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", **settings))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return model.eval(), folder


@pytest.mark.parametrize("lora, refused", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"alpha_pattern": {"q_proj": 16}}, "alpha per module"),
    ({"use_rslora": True, "rank_pattern": {"q_proj": 8}}, "rank per module"),
])
def test_what_llama_cpp_cannot_apply_is_refused(tmp_path, tiny_tokenizer, lora, refused):
    model, folder = _adapter(tmp_path, tiny_tokenizer, **lora)
    with pytest.raises(AfinarError, match=refused) as caught:
        adapter_for_llama_cpp(folder, model.base_model.model.config, tmp_path / "scratch")
    assert "--to gguf" in caught.value.hint


def test_a_lora_on_a_tied_head_is_refused(tmp_path, tiny_tokenizer):
    model, folder = _adapter(tmp_path, tiny_tokenizer, tied=True,
                             target_modules=["q_proj", "lm_head"])
    with pytest.raises(AfinarError, match="ties to the input embeddings"):
        adapter_for_llama_cpp(folder, model.base_model.model.config, tmp_path / "scratch")


@pytest.fixture
def base_gguf(tmp_path, tiny_tokenizer):
    base = _base(tiny_tokenizer)
    folder = tmp_path / "base"
    write_hf_folder(base, tiny_tokenizer, stop_token_ids(tiny_tokenizer, base), folder, "f32")
    return convert_model(folder, tmp_path / "base-f32.gguf", "f32", {}, lambda m: None), folder


def _lora_logit_error(model, base_path, lora_path, tokenizer) -> float:
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(base_path, lora=lora_path, logits_all=True) as llm:
        got = llm.logits(ids)
    return float(np.abs(got - want).max() / (want.max() - want.min()))


def test_rslora_alpha_is_rescaled_for_llama_cpp(tmp_path, tiny_tokenizer, base_gguf):
    base_path, base_folder = base_gguf
    model, folder = _adapter(tmp_path, tiny_tokenizer, use_rslora=True, r=16, lora_alpha=8)
    staged = adapter_for_llama_cpp(folder, model.base_model.model.config, tmp_path / "scratch")
    assert staged != folder
    assert json.loads((staged / "adapter_config.json").read_text())["lora_alpha"] == 8 * 4.0
    lora = convert_adapter(staged, base_folder, tmp_path / "lora-f32.gguf", "f32", {},
                           lambda m: None)
    assert _lora_logit_error(model, base_path, lora, tiny_tokenizer) < 1e-3
    # Converted as it is, llama.cpp would scale the update by alpha/r: a different model.
    unscaled = convert_adapter(folder, base_folder, tmp_path / "unscaled-f32.gguf", "f32", {},
                               lambda m: None)
    assert _lora_logit_error(model, base_path, unscaled, tiny_tokenizer) > 1e-2


def test_plain_lora_is_converted_as_it_is(tmp_path, tiny_tokenizer, base_gguf):
    base_path, base_folder = base_gguf
    model, folder = _adapter(tmp_path, tiny_tokenizer)
    assert adapter_for_llama_cpp(folder, model.base_model.model.config, tmp_path) == folder
    lora = convert_adapter(folder, base_folder, tmp_path / "lora-f16.gguf", "f16", {},
                           lambda m: None)
    assert _lora_logit_error(model, base_path, lora, tiny_tokenizer) < 2e-3


def test_a_sliding_window_shorter_than_the_context_is_refused_clearly():
    from transformers import MistralConfig, Qwen2Config

    with pytest.raises(AfinarError, match="last 16 tokens") as caught:
        check_model_config(MistralConfig(sliding_window=16, max_position_embeddings=512))
    assert "--to merged" in caught.value.hint
    check_model_config(MistralConfig(sliding_window=None))
    check_model_config(Qwen2Config())  # window off by default
    with pytest.raises(AfinarError, match="sliding-window"):
        check_model_config(Qwen2Config(use_sliding_window=True, sliding_window=16,
                                       num_hidden_layers=4, max_window_layers=2))


def _tokenizer_json(tmp_path, pre: dict | None, normalizer: dict | None = None,
                    model: dict | None = None):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": model or {"type": "BPE"}, "pre_tokenizer": pre,
                                "normalizer": normalizer}))
    return path


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}


def test_pre_tokenizer_names_from_tokenizer_json(tmp_path):
    assert pre_tokenizer_name(_tokenizer_json(tmp_path, {"type": "ByteLevel"})) == "gpt-2"
    digits = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}
    assert pre_tokenizer_name(_tokenizer_json(tmp_path, digits)) == "smollm"
    assert pre_tokenizer_name(_tokenizer_json(tmp_path, _split_then_bytes(LLAMA3_REGEX))) \
        == "llama-bpe"
    assert pre_tokenizer_name(_tokenizer_json(tmp_path, _split_then_bytes(QWEN2_REGEX),
                                              {"type": "NFC"})) == "qwen2"
    # A normalisation llama.cpp would not apply, an unknown split, SentencePiece: no name.
    assert pre_tokenizer_name(_tokenizer_json(tmp_path, _split_then_bytes(LLAMA3_REGEX),
                                              {"type": "Lowercase"})) is None
    assert pre_tokenizer_name(_tokenizer_json(tmp_path, _split_then_bytes("\\w+"))) is None
    assert pre_tokenizer_name(_tokenizer_json(
        tmp_path, None, model={"type": "BPE", "byte_fallback": True})) is None
    assert pre_tokenizer_name(tmp_path / "missing.json") is None
