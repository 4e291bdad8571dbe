"""The tiny random model of the tests, built without pytest: a 2-layer LlamaForCausalLM and a BPE
tokenizer trained here on a small corpus, with a chat template. conftest.py's fixtures use it, and
so does bench/_smoke.py (the benchmarks' `--smoke` mode), which puts this folder on sys.path.
Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "soporte-triaje" / "data.jsonl"

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _corpus() -> list[str]:
    lines = []
    for raw in BUNDLED.read_text(encoding="utf-8").splitlines():
        for m in json.loads(raw)["messages"]:
            lines.append(m["content"])
    return lines + ["hello world", "the quick brown fox", "system user assistant"]


def build_tokenizer(template: str = CHATML, bos: str | None = None, eos: str = "<|im_end|>",
                    pad: str | None = "<|im_end|>", extra_specials: tuple[str, ...] = (),
                    added: tuple[str, ...] = (), pre_tokenizer=None, normalizer=None):
    """`extra_specials`: more special tokens (a family's control tokens); `added`: tokens kept
    whole but decoded as text (like Qwen3's <think>); `pre_tokenizer`/`normalizer`: a family's
    own (tokenizers objects), instead of GPT-2's byte-level split."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<|endoftext|>", eos_token=eos, pad_token=pad,
        bos_token=bos)
    fast.chat_template = template
    return fast


def build_tiny_model(tokenizer, seed: int = 0, tied: bool = True):
    """`tied=False`: the head gets weights of its own. A tied random model's greedy answer repeats
    the prompt's last token (a newline after "assistant"), so its answers are blank text; an
    untied one writes (random) text, which the generation benchmarks' smoke runs count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=tied)
    return LlamaForCausalLM(config)
