"""`preserve`: the replay set is built once per base model and cached, counted in the data
report, weighted like a task example; the data report flags one-format data; the evaluation
counts leaks across system prompts. Real training on a tiny random Llama."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from afinar import rundir
from afinar.config import TrainConfig
from afinar.data.stats import answer_shape, format_concentration
from afinar.data.validate import load_examples
from afinar.evaluation import regressions
from afinar.train import replay
from afinar.train.recipe import train
from afinar.losses.supervised import supervised_ce
from tests.conftest import build_tiny_model, write_jsonl

SYSTEM = "Eres el asistente de triaje de Acme."


@pytest.fixture
def one_format_file(tmp_path):
    records = [{"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"pedido {i} llegó roto"},
        {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta"}]}
        for i in range(24)]
    return write_jsonl(tmp_path / "one_format.jsonl", records)


@pytest.fixture(scope="module")
def talking_model_dir(tmp_path_factory, tiny_tokenizer):
    """The tiny random Llama answers every prompt with newlines only (an empty answer, which
    replay skips); with the newline's embedding zeroed it answers with words."""
    folder = tmp_path_factory.mktemp("talking-llama")
    model = build_tiny_model(tiny_tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight[tiny_tokenizer("\n", add_special_tokens=False)[
            "input_ids"]] = 0
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _config(data, model_dir, out, **kw):
    base = dict(data=str(data), model=str(model_dir), output=str(out), learning_rate=1e-2,
                batch_size=4, max_steps=4, seed=0, precision="fp32", evaluate=False,
                preserve=True)
    return TrainConfig(**{**base, **kw})


def test_replay_set_is_built_once_cached_and_counted(tmp_path, talking_model_dir,
                                                     one_format_file, monkeypatch):
    tiny_model_dir = talking_model_dir
    monkeypatch.setenv("AFINAR_HOME", str(tmp_path / "home"))
    events = []
    first = train(_config(one_format_file, tiny_model_dir, tmp_path / "a"), on_event=events.append)
    info = json.loads((first.run_dir / rundir.DATA_REPORT).read_text())["preserve"]
    n_prompts = len(replay.load_prompts())
    n_train = json.loads((first.run_dir / rundir.DATA_REPORT).read_text())["split"]["train"]
    task_prompts = math.ceil(0.25 * n_train)
    assert info["generated"] == n_prompts + task_prompts and info["from_cache"] == 0
    assert info["examples"] > 0
    assert info["per_epoch"] == math.ceil(0.25 * n_train) + info["variants"]["task"]
    assert set(info["variants"]) <= {"none", "other", "data", "task"}
    assert info["variants"].get("data") and info["variants"].get("task")
    assert info["data_system_prompts"] == 1
    assert first.summary["preserve"] == info["per_epoch"]
    messages = [e["message"] for e in events if e["type"] == "log"]
    assert any(m.startswith("preserve:") and "generated now" in m for m in messages)
    assert list((tmp_path / "home" / "cache" / "answers").glob("*.json"))

    second = train(_config(one_format_file, tiny_model_dir, tmp_path / "b"))
    again = json.loads((second.run_dir / rundir.DATA_REPORT).read_text())["preserve"]
    assert again["generated"] == 0 and again["from_cache"] == n_prompts + task_prompts
    assert again["examples"] == info["examples"]

    off = train(_config(one_format_file, tiny_model_dir, tmp_path / "c", preserve=False))
    assert "preserve" not in json.loads((off.run_dir / rundir.DATA_REPORT).read_text())
    assert off.summary["preserve"] == 0


def test_replay_items_weigh_like_a_task_example(tmp_path, tiny_tokenizer, talking_model_dir,
                                                one_format_file, monkeypatch):
    tiny_model_dir = talking_model_dir
    from afinar.data.prepare import prepare_data
    from afinar.data.tokenize import ChatEncoder
    from afinar.models.load import stop_token_ids
    from afinar.models.registry import resolve_model

    monkeypatch.setenv("AFINAR_HOME", str(tmp_path / "home"))
    config = _config(one_format_file, tiny_model_dir, tmp_path / "x")
    encoder = ChatEncoder(tiny_tokenizer, stop_token_ids(tiny_tokenizer))
    data = prepare_data(config, encoder)
    built = replay.build_replay(config, resolve_model(str(tiny_model_dir)), encoder,
                                data.train_examples, data.train, torch.device("cpu"),
                                notify=lambda m: None)
    mean_task = sum(t.n_supervised for t in data.train) / len(data.train)
    for item in built.items:
        head = min(replay.FULL_WEIGHT_TOKENS, item.n_supervised)
        assert item.full_weight_tokens == head and replay.MIN_WEIGHT <= item.weight <= 1
        total = head + (item.n_supervised - head) * item.weight
        if replay.MIN_WEIGHT < item.weight < 1:
            assert total == pytest.approx(mean_task, rel=1e-6)
    # In a batch, the first supervised tokens weigh 1 and the rest the example's weight.
    from afinar.data.batching import collate, target_weight

    long = max(built.items, key=lambda t: t.n_supervised)
    batch = collate([long, data.train[0]], pad_id=0)
    labels = batch["labels"]
    weights = batch["weights"][0][labels[0] != -100]
    assert weights[:long.full_weight_tokens].eq(1).all()
    assert torch.allclose(weights[long.full_weight_tokens:], torch.tensor(long.weight))
    assert batch["weights"][1][labels[1] != -100].eq(1).all()
    assert target_weight(batch) == pytest.approx(
        long.full_weight_tokens + (long.n_supervised - long.full_weight_tokens) * long.weight
        + data.train[0].n_supervised - (1 if labels[1, 0] != -100 else 0), rel=1e-5)
    # Rotation: a function of the epoch alone, and every replay example comes up.
    # The data's prompts under other system prompts come every epoch; the general ones rotate.
    task = {i for i, ex in enumerate(built.examples) if ex.extra["replay"] == "task"}
    assert task
    seen = set()
    for epoch in range(math.ceil(len(built.items) / built.per_epoch)):
        picked = built.for_epoch(epoch)
        assert picked == built.for_epoch(epoch) and task <= set(picked)
        assert len(picked) == built.per_epoch + len(task)
        seen.update(picked)
    assert seen == set(range(len(built.items)))


def test_weighted_loss_scales_each_row():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 5, 8)
    labels = torch.randint(0, 11, (2, 5))
    labels[:, :2] = -100
    plain, count, _ = supervised_ce(hidden, labels, head)
    weights = torch.tensor([[1.0] * 5, [0.25] * 5])
    weighted, wcount, _ = supervised_ce(hidden, labels, head, weights=weights)
    row0, _, _ = supervised_ce(hidden[:1], labels[:1], head)
    row1, _, _ = supervised_ce(hidden[1:], labels[1:], head)
    assert plain.item() == pytest.approx(row0.item() + row1.item(), rel=1e-5)
    assert weighted.item() == pytest.approx(row0.item() + 0.25 * row1.item(), rel=1e-5)
    assert count.item() == 6 and wcount.item() == pytest.approx(3 + 0.75)


def test_preserve_defaults_and_prompt_sets_stay_apart():
    assert TrainConfig(data="x").preserve_on()
    assert not TrainConfig(data="x", method="full").preserve_on()
    assert TrainConfig(data="x", method="full", preserve=True).preserve_on()
    # The evaluation's probes and other-assistant system prompts are never trained on.
    probes = {normalize_text(p.messages[-1].content) for p in regressions.load_probes()}
    trained = {normalize_text(p["messages"][-1]["content"]) for p in replay.load_prompts()}
    assert not probes & trained
    eval_systems = set(json.loads(regressions.OTHER_SYSTEMS_FILE.read_text()))
    assert not eval_systems & set(replay.other_system_prompts())


def normalize_text(text: str) -> str:
    return re.sub(r"\W+", " ", text.casefold()).strip()


def test_data_report_flags_one_system_prompt_and_one_answer_shape(one_format_file, tmp_path):
    assert answer_shape("Category: billing\nPriority: P2") == "Category: / Priority:"
    assert answer_shape("ALERTA ALTA | servicio: pagos") == "ALERTA"
    assert answer_shape("Sure! Here is how.\nFirst, open it.") == "text"
    shape = format_concentration(load_examples(one_format_file).examples)
    assert shape["one_format"] and shape["system_prompts"] == 1
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "user", "content": f"hola {i}"},
                      {"role": "assistant", "content": f"Hola, ¿en qué te ayudo? {i}"}]}
        for i in range(5)] + [json.loads(line) for line in
                              one_format_file.read_text().splitlines()])
    assert not format_concentration(load_examples(mixed).examples)["one_format"]


def test_data_report_warning_names_preserve(tmp_path, tiny_model_dir, one_format_file,
                                             monkeypatch):
    from afinar.data.prepare import prepare_data
    from afinar.data.tokenize import ChatEncoder
    from afinar.models.load import load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(str(tiny_model_dir))
    encoder = ChatEncoder(tokenizer, stop_token_ids(tokenizer))
    for preserve, expected in ((True, "`preserve` (on) mixes in"), (False, "turn on `preserve`")):
        config = _config(one_format_file, tiny_model_dir, tmp_path / "r", preserve=preserve)
        data = prepare_data(config, encoder)
        assert data.report["stats"]["format"]["one_format"]
        assert any(expected in w for w in data.warnings)


def test_cross_system_leaks_are_counted(tmp_path):
    examples = load_examples(write_jsonl(tmp_path / "x.jsonl", [
        {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "Categoría: x\nPrioridad: y"}]},
        {"messages": [{"role": "user", "content": "hola"},
                      {"role": "assistant", "content": "Hola"}]}])).examples
    probes = regressions.load_probes()
    sets = regressions.cross_system_prompts(examples, probes)
    under = sets["probes_under_task_system"]
    moved = sets["task_under_other_system"]
    assert len(under) == regressions.PROBES_PER_SYSTEM
    assert all(messages[0] == {"role": "system", "content": SYSTEM} for _, messages in under)
    assert len(moved) == 1 and moved[0][1][0]["content"] != SYSTEM
    assert moved[0][1][1:] == [{"role": "user", "content": "a"}]
    tuned = {"probes_under_task_system": ["Categoría: x"] * 3 + ["ok"] * (len(under) - 3),
             "task_under_other_system": ["Categoría: x"]}
    base = {name: ["ok"] * len(items) for name, items in sets.items()}
    out = regressions.compare_cross_system(sets, tuned, base, "Categoría:")
    assert out["sets"]["probes_under_task_system"]["model_leaks"] == 3
    assert out["sets"]["task_under_other_system"]["model_leaks"] == 1
    assert out["sets"]["task_under_other_system"]["baseline_leaks"] == 0
    assert len(out["warnings"]) == 2



def test_auto_learning_rate_follows_model_size_and_epochs_the_data():
    from afinar.config import auto_epochs, auto_learning_rate

    assert auto_learning_rate("lora", 7e9) == pytest.approx(2e-4)
    assert auto_learning_rate("lora", 135e6) == pytest.approx(9.7e-4)  # the embedded model
    assert auto_learning_rate("lora", 1e5) == 1e-3 and auto_learning_rate("lora", 1e12) == 1e-4
    assert auto_learning_rate("full", 135e6) == pytest.approx(9.7e-5)
    assert auto_learning_rate("lora", None) == 2e-4  # size unknown: the 7B recipes' value
    sizes = [135e6, 360e6, 1.2e9, 3e9, 8e9]
    rates = [auto_learning_rate("lora", n) for n in sizes]
    assert rates == sorted(rates, reverse=True)
    config = TrainConfig(data="x", learning_rate_multiplier=2)
    assert config.resolved_learning_rate(135e6) == pytest.approx(2 * 9.7e-4)
    assert TrainConfig(data="x", learning_rate=3e-4).resolved_learning_rate(135e6) == 3e-4
    assert auto_epochs(44) == 5 and auto_epochs(144) == 2 and auto_epochs(5) == 25
    assert auto_epochs(20_000) == 1
    assert auto_epochs(1000, tokens_per_epoch=15_000_000) == 1


def test_the_replay_set_is_answered_by_the_runs_engine_and_cached_per_engine(
        tmp_path, talking_model_dir, one_format_file, monkeypatch):
    """llama.cpp answers the base model's replay prompts (in parallel); its answers are cached
    under its own key, so transformers' are never mistaken for them, nor the other way."""
    from afinar.engines import base_answerer
    from afinar.pipeline import fine_tune

    monkeypatch.setenv("AFINAR_HOME", str(tmp_path / "home"))
    planned = base_answerer(str(talking_model_dir), "llamacpp")
    assert planned.signature[0] == "llama.cpp" and planned.signature[2].endswith(".gguf")
    assert base_answerer(str(talking_model_dir), "transformers") is None
    runs = {}
    for name, engine in (("llama", "llamacpp"), ("again", "llamacpp"), ("tf", "transformers")):
        result = fine_tune(_config(one_format_file, talking_model_dir, tmp_path / name,
                                   engine=engine))
        runs[name] = json.loads((result.run_dir / rundir.DATA_REPORT).read_text())["preserve"]
    assert runs["llama"]["generated"] > 0 and runs["llama"]["examples"] > 0
    assert runs["again"]["generated"] == 0 and runs["again"]["from_cache"] == \
        runs["llama"]["generated"]
    assert runs["tf"]["from_cache"] == 0 and runs["tf"]["generated"] == runs["llama"]["generated"]
    assert len(list((tmp_path / "home" / "cache" / "answers").glob("*.json"))) == 2
