"""llama.cpp's own converter as afinar runs it (export/convert.py): tiny random models of the
architectures afinar exports, saved as Hugging Face folders, converted by the real converter in
its child process, then run by real llama.cpp, whose logits must match transformers'. Also what
the converter is told (metadata, a pre-tokenizer it cannot identify) and how it fails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from afinar.errors import AfinarError
from afinar.export import convert
from afinar.export.convert import convert_model, find_converter
from afinar.export.llama_runner import LlamaCpp
from afinar.export.merged import write_hf_folder
from afinar.models.load import stop_token_ids

TYPES = ("f32", "f16", "bf16", "q8_0")
# Logits of llama.cpp against transformers on the same ids: the largest absolute difference,
# relative to the spread of the logits (as measured with afinar's former writer: 3e-4, 6e-4,
# 5e-3, 2e-2).
LOGIT_TOLERANCE = {"f32": 1e-3, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 5e-2}
# Llama 3.1's RoPE scaling, shrunk so that it changes the tiny model's rotations within a short
# prompt (wavelengths above 64 positions are stretched): a file without rope_freqs would differ.
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
PROMPT = ("<|im_start|>user\nHola, el pedido 123 llegó roto y nadie contesta el teléfono"
          "<|im_end|>\n<|im_start|>assistant\n")


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
    elif arch == "llama3.1":
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False,
                                             rope_parameters=dict(LLAMA31_ROPE)))
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


def _convert(tmp_path, model, tokenizer, kind: str, metadata=None):
    folder = tmp_path / "hf"
    write_hf_folder(model, tokenizer, stop_token_ids(tokenizer, model), folder, "f32")
    messages: list[str] = []
    path = convert_model(folder, tmp_path / f"tiny-{kind}.gguf", kind, metadata or {},
                         messages.append)
    return path, messages


def _logit_error(model, path, tokenizer, text: str = PROMPT) -> tuple[float, float]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()
    with LlamaCpp(path, logits_all=True) as llm:
        assert llm.tokenize(text) == ids
        got = llm.logits(ids)
    error = float(np.abs(got - want).max() / (want.max() - want.min()))
    return error, float((got.argmax(-1) == want.argmax(-1)).mean())


@pytest.mark.parametrize("arch", ["llama", "llama3.1", "mistral", "qwen2"])
@pytest.mark.parametrize("kind", TYPES)
def test_llama_cpp_logits_match_transformers(tmp_path, tiny_tokenizer, arch, kind):
    model = _tiny(arch, tiny_tokenizer, seed=1)
    path, _ = _convert(tmp_path, model, tiny_tokenizer, kind)
    assert not list(tmp_path.glob(".*partial"))
    error, argmax = _logit_error(model, path, tiny_tokenizer)
    print(f"{arch} {kind}: max logit error {error:.2e} of the spread")
    assert error < LOGIT_TOLERANCE[kind]
    assert argmax >= (1.0 if kind == "f32" else 0.9)


def test_llama31_rope_factors_are_what_makes_it_match(tmp_path, tiny_tokenizer):
    """The same weights without the llama3 scaling in the config: llama.cpp then rotates like
    plain Llama, and the logits part from the scaled model's (so the test above, which matches,
    shows that the converter's rope_freqs are right)."""
    import gguf

    scaled = _tiny("llama3.1", tiny_tokenizer, seed=1)
    path, _ = _convert(tmp_path, scaled, tiny_tokenizer, "f32")
    names = [t.name for t in gguf.GGUFReader(str(path)).tensors]
    assert "rope_freqs.weight" in names
    plain = _tiny("llama", tiny_tokenizer, seed=1)
    plain.load_state_dict(scaled.state_dict())
    other = tmp_path / "plain"
    other.mkdir()
    plain_path, _ = _convert(other, plain, tiny_tokenizer, "f32")
    error, _ = _logit_error(scaled, plain_path, tiny_tokenizer)
    assert error > LOGIT_TOLERANCE["f32"] * 10


def test_metadata_pre_tokenizer_and_chat_format(tmp_path, tiny_tokenizer):
    import gguf

    model = _tiny("llama", tiny_tokenizer)
    path, messages = _convert(tmp_path, model, tiny_tokenizer, "f16", {"afinar.run": "r1"})
    fields = gguf.GGUFReader(str(path)).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("general.architecture") == "llama"
    assert value("llama.attention.head_count_kv") == 2
    assert value("afinar.run") == "r1"
    assert value("afinar.converted_by") == find_converter().version
    assert value("afinar.converted_by").startswith("llama.cpp 0c1e57098 ")
    # The tests' tokenizer was trained here: llama.cpp's list does not have it, and afinar
    # named its pre-tokenizer from tokenizer.json (plain ByteLevel: GPT-2's).
    assert value("tokenizer.ggml.pre") == "gpt-2"
    assert any("pre-tokenizer is 'gpt-2'" in m for m in messages)
    assert value("tokenizer.chat_template") == tiny_tokenizer.chat_template
    im_start = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert value("tokenizer.ggml.token_type")[im_start] == gguf.TokenType.CONTROL
    assert value("tokenizer.ggml.eos_token_id") == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_tokenizer_nobody_can_name_is_a_clear_error(tmp_path):
    """A byte-level BPE whose pre-tokenizer has no llama.cpp twin: the converter refuses it, and
    the user reads why and what to do, not a traceback; no partial file is left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.ByteLevel()])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hola mundo, qué tal?"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    model = _tiny("llama", tokenizer)
    with pytest.raises(AfinarError) as caught:
        _convert(tmp_path, model, tokenizer, "f16")
    message = str(caught.value)
    assert "tiny-f16.gguf" in message and "does not know this tokenizer" in message
    assert "BPE pre-tokenizer was not recognized" in message  # the converter's own last words
    assert "--to merged" in caught.value.hint
    assert "Traceback" not in str(caught.value) and 'File "' not in str(caught.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_an_architecture_the_converter_lacks_is_a_clear_error(tmp_path, tiny_tokenizer):
    model = _tiny("llama", tiny_tokenizer)
    folder = tmp_path / "hf"
    write_hf_folder(model, tiny_tokenizer, stop_token_ids(tiny_tokenizer, model), folder, "f32")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AfinarError) as caught:
        convert_model(folder, tmp_path / "x-f16.gguf", "f16", {}, lambda m: None)
    assert "x-f16.gguf" in str(caught.value)
    assert "no conversion for this architecture" in str(caught.value)
    assert "NoSuchModelForCausalLM" in str(caught.value)
    assert "--to merged" in caught.value.hint


def test_without_the_converter_the_error_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(convert.CONVERTER_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(AfinarError) as caught:
        find_converter()
    assert "convert_hf_to_gguf.py" in str(caught.value)
    assert "install_llama_cpp.sh" in caught.value.hint


def test_the_converter_is_the_pinned_one_with_its_licence():
    converter = find_converter()
    assert converter.llama_cpp_python == convert.LLAMA_CPP_PYTHON
    import llama_cpp

    assert llama_cpp.__version__ == converter.llama_cpp_python  # runtime and converter match
    assert "MIT License" in (converter.home / "LICENSE").read_text()
    source = json.loads((converter.home / convert.SOURCE_FILE).read_text())
    assert len(source["sdist_sha256"]) == 64
