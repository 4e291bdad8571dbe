"""Which token positions carry loss, token by token, for every input format."""

from __future__ import annotations

import pytest
from tokenizers.processors import TemplateProcessing

from afinar.data.batching import collate
from afinar.data.example import Example, Message
from afinar.data.tokenize import IGNORE, ChatEncoder, TemplateError
from afinar.data.validate import load_examples
from conftest import build_tokenizer, write_jsonl

SYS = "<|im_start|>system\nYou are a test model.<|im_end|>\n"


def _encoder(tokenizer):
    return ChatEncoder(tokenizer, [tokenizer.eos_token_id])


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _expected(tokenizer, pieces):
    """pieces: (text, trained?) in order → the label list the encoder must produce."""
    labels = []
    for text, trained in pieces:
        ids = _ids(tokenizer, text)
        labels += ids if trained else [IGNORE] * len(ids)
    return labels


def _encode_file(tmp_path, tokenizer, record):
    path = write_jsonl(tmp_path / "one.jsonl", [record])
    example = load_examples(path).examples[0]
    return _encoder(tokenizer).encode(example)


def test_chat_multi_turn_trains_only_weighted_assistant_turns(tmp_path, tiny_tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Sé breve."},
        {"role": "user", "content": "hola"},
        {"role": "assistant", "content": "no aprendas esto", "weight": 0},
        {"role": "user", "content": "pedido roto"},
        {"role": "assistant", "content": "Categoría: envío"},
    ]}
    item = _encode_file(tmp_path, tiny_tokenizer, record)
    expected = _expected(tiny_tokenizer, [
        ("<|im_start|>system\nSé breve.<|im_end|>\n<|im_start|>user\nhola<|im_end|>\n"
         "<|im_start|>assistant\nno aprendas esto<|im_end|>\n<|im_start|>user\npedido roto"
         "<|im_end|>\n<|im_start|>assistant\n", False),
        ("Categoría: envío<|im_end|>", True),
        ("\n", False),
    ])
    assert item.labels == expected
    assert len(item.input_ids) == len(expected)
    trained = [t for t, lab in zip(item.input_ids, item.labels) if lab != IGNORE]
    assert trained[-1] == tiny_tokenizer.eos_token_id  # the model learns to stop
    assert tiny_tokenizer.decode(trained) == "Categoría: envío<|im_end|>"


def test_both_assistant_turns_train_by_default(tmp_path, tiny_tokenizer):
    record = {"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "dos"}]}
    item = _encode_file(tmp_path, tiny_tokenizer, record)
    assert item.labels == _expected(tiny_tokenizer, [
        (SYS + "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False),
        ("uno<|im_end|>", True),
        ("\n<|im_start|>user\nb<|im_end|>\n<|im_start|>assistant\n", False),
        ("dos<|im_end|>", True), ("\n", False)])


def test_prompt_completion_trains_completion_only(tmp_path, tiny_tokenizer):
    item = _encode_file(tmp_path, tiny_tokenizer, {"prompt": "capital de Francia",
                                                   "completion": "París"})
    assert item.labels == _expected(tiny_tokenizer, [
        (SYS + "<|im_start|>user\ncapital de Francia<|im_end|>\n<|im_start|>assistant\n", False),
        ("París<|im_end|>", True), ("\n", False)])


def test_alpaca_trains_output_only(tmp_path, tiny_tokenizer):
    item = _encode_file(tmp_path, tiny_tokenizer, {"instruction": "Traduce", "input": "hello",
                                                   "output": "hola"})
    assert item.labels == _expected(tiny_tokenizer, [
        (SYS + "<|im_start|>user\nTraduce\n\nhello<|im_end|>\n<|im_start|>assistant\n", False),
        ("hola<|im_end|>", True), ("\n", False)])


def test_sharegpt_trains_gpt_turns(tmp_path, tiny_tokenizer):
    item = _encode_file(tmp_path, tiny_tokenizer, {"conversations": [
        {"from": "human", "value": "hola"}, {"from": "gpt", "value": "buenas"}]})
    assert item.labels == _expected(tiny_tokenizer, [
        (SYS + "<|im_start|>user\nhola<|im_end|>\n<|im_start|>assistant\n", False),
        ("buenas<|im_end|>", True), ("\n", False)])


def test_text_trains_every_token_and_appends_eos(tmp_path, tiny_tokenizer):
    item = _encode_file(tmp_path, tiny_tokenizer, {"text": "the quick brown fox"})
    ids = _ids(tiny_tokenizer, "the quick brown fox") + [tiny_tokenizer.eos_token_id]
    assert item.input_ids == ids
    assert item.labels == ids


def test_eos_keeps_its_loss_when_pad_equals_eos(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id  # the risky setup
    enc = _encoder(tiny_tokenizer)
    short = enc.encode(Example((Message("user", "a"), Message("assistant", "b", True))))
    long = enc.encode(Example((Message("user", "a much longer question here"),
                               Message("assistant", "and a longer answer", True))))
    batch = collate([short, long], tiny_tokenizer.pad_token_id)
    labels = batch["labels"][0].tolist()
    n = len(short.input_ids)
    eos_positions = [i for i in range(n) if short.input_ids[i] == tiny_tokenizer.eos_token_id]
    last_answer_eos = max(i for i in eos_positions if short.labels[i] != IGNORE)
    assert labels[last_answer_eos] == tiny_tokenizer.eos_token_id
    assert all(x == IGNORE for x in labels[n:])  # padding, same id as EOS, carries no loss
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (len(labels) - n)


def test_no_doubled_bos():
    template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}"
                "<|im_end|>{% endfor %}{% if add_generation_prompt %}[assistant]\n{% endif %}")
    tokenizer = build_tokenizer(template, bos="<s>")
    bos = tokenizer.bos_token_id
    # A tokenizer that also adds BOS itself: the classic doubled-BOS trap.
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hola"}], tokenize=False)
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]  # naive tokenisation doubles it
    item = _encoder(tokenizer).encode(Example((Message("user", "hola"),
                                               Message("assistant", "adiós", True))))
    assert item.input_ids[0] == bos and item.input_ids[1] != bos
    prompt = _encoder(tokenizer).prompt_ids([Message("user", "hola")])
    assert prompt[0] == bos and prompt[1] != bos
    assert item.input_ids[:len(prompt)] == prompt  # training prompt == inference prompt


def test_template_that_is_not_prefix_stable_fails_loudly():
    # Renders the last message differently: earlier turns change as the conversation grows.
    template = ("{% for m in messages %}{% if loop.last %}<|im_start|>{{ m['role'] }}!"
                "{% else %}<|im_start|>{{ m['role'] }}{% endif %}\n{{ m['content'] }}<|im_end|>"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = build_tokenizer(template)
    example = Example((Message("user", "a"), Message("assistant", "b", True)), path="f", line=3)
    with pytest.raises(TemplateError, match="f:3.*prefix-stable"):
        _encoder(tokenizer).encode(example)
