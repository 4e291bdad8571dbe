"""Tokenisation is cached across runs and invalidated by any change it depends on."""

from __future__ import annotations

from afinar.config import TrainConfig
from afinar.data.prepare import prepare_data
from afinar.data.tokenize import ChatEncoder
from conftest import build_tokenizer


def test_second_prepare_hits_cache_and_changes_miss(tmp_path, monkeypatch, small_chat_file,
                                                    tiny_tokenizer):
    monkeypatch.setenv("AFINAR_HOME", str(tmp_path / "home"))
    config = TrainConfig(data=str(small_chat_file), model="unused")
    encoder = ChatEncoder(tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    first = prepare_data(config, encoder)
    second = prepare_data(config, encoder)
    assert first.report["tokenization_cache"] == "miss"
    assert second.report["tokenization_cache"] == "hit"
    assert [t.input_ids for t in first.train] == [t.input_ids for t in second.train]
    assert [t.labels for t in first.held] == [t.labels for t in second.held]

    other_template = build_tokenizer(tiny_tokenizer.chat_template.replace("test model", "bot"))
    changed = prepare_data(config, ChatEncoder(other_template, [other_template.eos_token_id]))
    assert changed.report["tokenization_cache"] == "miss"

    small_chat_file.write_text(small_chat_file.read_text().replace("roto", "rota"))
    assert prepare_data(config, encoder).report["tokenization_cache"] == "miss"
