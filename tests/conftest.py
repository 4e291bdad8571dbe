"""Shared fixtures. Nothing here downloads anything.

`tiny_model_dir`: a random 2-layer LlamaForCausalLM with a BPE tokenizer trained here on a small
corpus and a ChatML template (pad == eos on purpose, like SmolLM2), saved as an HF folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The serve tests' fixtures (`server`, `client`) live in tests/serving.py; the dashboard
# browser tests' (`dash`, `page`) in tests/browser.py.
pytest_plugins = ["serving", "browser"]
BUNDLED = ROOT / "examples" / "soporte-triaje" / "data.jsonl"

# The embedded model's converted copy is cached here across local runs (CI converts it once).
os.environ.setdefault("AFINAR_HOME", str(ROOT / ".afinar-test-home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
                    added: tuple[str, ...] = ()):
    """`extra_specials`: more special tokens (a family's control tokens); `added`: tokens kept
    whole but decoded as text (like Qwen3's <think>)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", *extra_specials]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model(tiny_tokenizer).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                    encoding="utf-8")
    return path


@pytest.fixture
def small_chat_file(tmp_path) -> Path:
    """40 short conversations teaching one fixed answer format; learnable by a tiny model."""
    records = []
    for i in range(40):
        records.append({"messages": [
            {"role": "user", "content": f"pedido {i} llegó roto"},
            {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"},
        ]})
    return write_jsonl(tmp_path / "small.jsonl", records)


# Checks for the evaluated run: `always` must score 1 and `never` 0, whatever the model says.
EVAL_CHECKS = r"""checks:
  - name: format
    when: {prompt_matches: pedido}
    regex: 'Categoría: \w+\nPrioridad: \w+\nRespuesta: .*'
  - {name: always, regex: '(?s).*'}
  - {name: never, regex: 'NEVER-MATCHES'}
leak_regex: 'Prioridad:'
"""


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, tiny_model_dir):
    """(TrainResult, folder): 30 LoRA steps on a tiny random Llama, then `afinar eval`."""
    from afinar.config import TrainConfig
    from afinar.train.loop import train

    folder = tmp_path_factory.mktemp("evaluated")
    records = [{"messages": [
        {"role": "user", "content": f"pedido {i} llegó roto"},
        {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"}]}
        for i in range(40)]
    data = write_jsonl(folder / "small.jsonl", records)
    (folder / "checks.yaml").write_text(EVAL_CHECKS, encoding="utf-8")
    config = TrainConfig(data=str(data), model=str(tiny_model_dir), output=str(folder / "run"),
                         learning_rate=1e-2, batch_size=4, max_steps=30, eval_steps=10, seed=0,
                         precision="fp32", checks=str(folder / "checks.yaml"))
    return train(config), folder


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(run dir, completed process): the README's `afinar demo` on the embedded model, run once
    per session and shared by the real-model tests (training it takes minutes)."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("demo") / "demo"
    afinar = str(Path(sys.executable).parent / "afinar")
    done = subprocess.run([afinar, "demo", "--output", str(run)], capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done
