"""Tiny random models of the families users bring, each with a locally trained tokenizer whose
chat template, special tokens, BOS/EOS/pad and stop tokens have the shape of the family's
published instruct checkpoints. Nothing is downloaded: configs are built here.

    family = FAMILIES["gemma2"]
    folder = build_family(family, tmp_path)   # an HF folder: config, safetensors, tokenizer

The templates are written for these tests, modelled on each family's published template:
Llama 3.1 (always a system header, BOS written by the template), Qwen2.5 (ChatML with a default
system prompt), Qwen3 (ChatML; the last answer carries an empty <think> block), Mistral v0.3
([INST], the system prompt joined to the last user turn), Gemma 2 (refuses a system role),
Gemma 3 (joins it to the first user turn), Phi-3 (<|user|>/<|end|>, EOS after the last turn),
SmolLM2 (ChatML with a default system prompt; its BOS is <|im_start|>).

Tokenizers (family_tokenizers.py) are what llama.cpp's converter takes for the family: byte-level
BPE declaring the published pre-tokenizer (Llama 3, Qwen2.5/3, SmolLM2), or a SentencePiece
tokenizer.model beside tokenizer.json (Mistral, Gemma 2/3, Phi-3), trained here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from family_tokenizers import (GEMMA_SPM, MISTRAL_SPM, PHI3_SPM, SentencePieceSpec, bpe_pipeline,
                               sentencepiece_tokenizer)
from tiny_llama import build_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] | trim %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{ 'Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n' + system }}"
    "{{ '<|eot_id|>' }}"
    "{% for m in turns %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{{ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")

QWEN25 = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Answers after the last user message get a (here empty) reasoning block; earlier ones do not.
QWEN3 = (
    "{% set ns = namespace(last_user=-1) %}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")

MISTRAL = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{{ bos_token }}{% for m in turns %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{% if loop.last and system is defined %}"
    "{{ '[INST] ' + system + '\n\n' + m['content'] + '[/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] | trim + eos_token }}{% endif %}{% endfor %}")

_GEMMA_TURNS = (
    "{% for m in turns %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') }}"
    "{{ m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set prefix = '' %}{% set turns = messages %}" + _GEMMA_TURNS)
GEMMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}" + _GEMMA_TURNS)

PHI3 = (
    "{% for m in messages %}{% if m['role'] == 'system' and m['content'] %}"
    "{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

SMOLLM2 = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    bos: str | None
    eos: str
    pad: str | None
    end_of_turn: str  # the token that ends an assistant turn (and must carry loss)
    specials: tuple[str, ...]  # control tokens beyond conftest's
    config: Callable  # (tokenizer, ids) -> a transformers config
    stops: tuple[str, ...] = ()  # more EOS ids in the generation config
    adds_bos: bool = False  # the tokenizer itself prepends BOS (the template writes it too)
    added: tuple[str, ...] = ()  # non-special added tokens
    # How the template treats a system message: own (its own block), last_user (joined to the
    # last user turn), first_user (joined to the first user turn), refused (raises).
    system: str = "own"
    # Why `--to gguf` refuses this tiny model (a regex of the error; each points to --to merged);
    # "" where it exports.
    gguf_error: str = "does not support the .* architecture"
    ollama_error: str = "does not support the .* architecture"
    # The tokenizer llama.cpp's converter is given: a byte-level BPE declaring this
    # pre-tokenizer (llama.cpp's name for it), or a SentencePiece model.
    bpe: str | None = None
    spm: SentencePieceSpec | None = None
    bos_opens_turns: bool = False  # SmolLM2's BOS is <|im_start|>: every turn has one
    notes: dict = field(default_factory=dict)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _llama(ids):
    from transformers import LlamaConfig

    return LlamaConfig(**_SMALL, **ids, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 128})


def _qwen2(ids):
    from transformers import Qwen2Config

    return Qwen2Config(**_SMALL, **ids, tie_word_embeddings=True)  # q/k/v biases: built in


def _qwen3(ids):
    from transformers import Qwen3Config

    return Qwen3Config(**_SMALL, **ids, head_dim=32, tie_word_embeddings=True)  # q/k norms


def _mistral(ids):
    from transformers import MistralConfig

    # A window shorter than the examples, so the sliding-window mask is exercised.
    return MistralConfig(**_SMALL, **ids, sliding_window=16, tie_word_embeddings=False)


def _gemma2(ids):
    from transformers import Gemma2Config

    return Gemma2Config(**_SMALL, **ids, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                        tie_word_embeddings=True)


def _gemma3(ids):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_SMALL, **ids, head_dim=16, query_pre_attn_scalar=16,
                            sliding_window=16, layer_types=["sliding_attention",
                                                            "full_attention"],
                            tie_word_embeddings=True)


def _smollm2(ids):
    from transformers import LlamaConfig

    return LlamaConfig(**_SMALL, **ids, tie_word_embeddings=True, rope_theta=100000.0)


def _phi3(ids):
    from transformers import Phi3Config

    # Phi3 fuses q/k/v into one qkv_proj and gate/up into gate_up_proj.
    return Phi3Config(**_SMALL, **ids, original_max_position_embeddings=512,
                      tie_word_embeddings=False)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama3", LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
           end_of_turn="<|eot_id|>", specials=("<|begin_of_text|>", "<|end_of_text|>",
                                               "<|start_header_id|>", "<|end_header_id|>",
                                               "<|eot_id|>"),
           stops=("<|end_of_text|>",), adds_bos=True, config=_llama, bpe="llama-bpe",
           gguf_error="rope scaling 'llama3'", ollama_error="rope scaling 'llama3'"),
    Family("qwen2.5", QWEN25, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
           end_of_turn="<|im_end|>", specials=(), stops=("<|endoftext|>",), config=_qwen2,
           bpe="qwen2",
           # transformers' Qwen2Tokenizer adds NFC, as the published tokenizer.json has it.
           gguf_error=r"normalizer \(NFC\)", ollama_error=r"normalizer \(NFC\)"),
    Family("qwen3", QWEN3, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
           end_of_turn="<|im_end|>", specials=(), stops=("<|endoftext|>",),
           added=("<think>", "</think>"), config=_qwen3, bpe="qwen2"),
    Family("mistral", MISTRAL, bos="<s>", eos="</s>", pad=None, end_of_turn="</s>",
           specials=("[INST]", "[/INST]"), adds_bos=True, system="last_user", config=_mistral,
           spm=MISTRAL_SPM,
           gguf_error="sliding-window attention", ollama_error="sliding-window attention"),
    Family("gemma2", GEMMA2, bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>",
           specials=("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
           stops=("<end_of_turn>",), adds_bos=True, system="refused", config=_gemma2,
           spm=GEMMA_SPM),
    Family("gemma3", GEMMA3, bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>",
           specials=("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
           stops=("<end_of_turn>",), adds_bos=True, system="first_user", config=_gemma3,
           spm=GEMMA_SPM),
    Family("phi3", PHI3, bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|end|>",
           specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), stops=("<|end|>",),
           config=_phi3, spm=PHI3_SPM),
    Family("smollm2", SMOLLM2, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
           end_of_turn="<|im_end|>", specials=(), config=_smollm2, bpe="smollm",
           bos_opens_turns=True, gguf_error="", ollama_error=""),
)}


def _mistral_v03(ids):
    from transformers import MistralConfig

    # As Mistral v0.3 publishes it: no sliding window (llama.cpp's Mistral attends to all).
    return MistralConfig(**_SMALL, **ids, sliding_window=None, tie_word_embeddings=False)


# Families as GGUF export takes them where the tiny model above is built to exercise something
# llama.cpp refuses (Mistral's 16-token window, for the training tests).
GGUF_VARIANTS: dict[str, Family] = {
    "mistral": replace(FAMILIES["mistral"], name="mistral-v0.3", config=_mistral_v03)}


def find_family(name: str) -> Family:
    return FAMILIES.get(name) or next(f for f in GGUF_VARIANTS.values() if f.name == name)


def family_tokenizer(family: Family, folder: Path):
    """The family's tokenizer; SentencePiece families also get their tokenizer.model in
    `folder` (where the model is saved)."""
    if family.spm is not None:
        return sentencepiece_tokenizer(family.spm, folder, family.template, eos=family.eos,
                                       pad=family.pad)
    tok = build_tokenizer(family.template, bos=family.bos, eos=family.eos, pad=family.pad,
                          extra_specials=family.specials, added=family.added,
                          **bpe_pipeline(family.bpe))
    if family.adds_bos:  # like the published tokenizers: encoding text prepends BOS
        from tokenizers.processors import TemplateProcessing

        tok._tokenizer.post_processor = TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, tok.convert_tokens_to_ids(family.bos))])
    return tok


def build_family(family: Family, folder: Path, seed: int = 0) -> Path:
    """Saves a random tiny model of the family and its tokenizer as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tok = family_tokenizer(family, folder)
    eos = [tok.convert_tokens_to_ids(t) for t in (family.eos, *family.stops)]
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=eos[0],
               pad_token_id=tok.pad_token_id)
    config = family.config(ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tok.pad_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
