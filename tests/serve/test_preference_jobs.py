"""Preference jobs through OpenAI's fine-tuning API, with the real `openai` client against a real
`afinar serve`: SFT, then DPO from the fine-tuned model, ORPO, and the 400s for bad methods."""

from __future__ import annotations

import csv
import io

import openai
import pytest

from conftest import write_jsonl
from serving import chat_records, make_server, wait_for


def _pairs(n=24):
    return [{"input": {"messages": [{"role": "user", "content": f"pedido {i} llegó roto"}]},
             "preferred_output": [{"role": "assistant",
                                   "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"}],
             "non_preferred_output": [{"role": "assistant",
                                       "content": f"lo siento mucho por el pedido {i}"}]}
            for i in range(n)]


@pytest.fixture(scope="module")
def pref_server(tmp_path_factory, tiny_model_dir):
    srv = make_server(tmp_path_factory.mktemp("serve-pref"), tiny_model_dir).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def files(pref_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pref-files")
    client = pref_server.client()
    chat = write_jsonl(folder / "chat.jsonl", chat_records(24))
    pairs = write_jsonl(folder / "pairs.jsonl", _pairs())
    return (client.files.create(file=open(chat, "rb"), purpose="fine-tune"),
            client.files.create(file=open(pairs, "rb"), purpose="fine-tune"))


def test_sft_then_dpo_from_the_fine_tuned_model(pref_server, files):
    client = pref_server.client()
    chat, pairs = files
    sft = wait_for(client, client.fine_tuning.jobs.create(
        training_file=chat.id, model="tiny", suffix="sft",
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 10}).id)
    assert sft.status == "succeeded", sft.error
    job = client.fine_tuning.jobs.create(
        training_file=pairs.id, model=sft.fine_tuned_model, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2,
                                                           "learning_rate_multiplier": 50}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.model == sft.fine_tuned_model
    assert job.fine_tuned_model.startswith("ft:tiny:afinar:dpo:")
    assert job.hyperparameters.n_epochs == 2
    events = list(client.fine_tuning.jobs.list_events(fine_tuning_job_id=job.id, limit=100))
    steps = [e.data for e in events if e.type == "metrics" and "train_loss" in e.data]
    valid = [e.data for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert steps and all("train_reward_margin" in d and "train_preference_accuracy" in d
                         for d in steps)
    assert valid[0]["valid_preference_accuracy"] > 0.5  # newest first: the last evaluation
    rows = list(csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text)))
    assert "train_reward_margin" in rows[0] and "valid_preference_accuracy" in rows[0]
    answer = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "pedido 3 llegó roto"}],
        max_tokens=8, temperature=0)
    assert answer.model == job.fine_tuned_model and answer.usage.completion_tokens <= 8


def test_orpo_is_an_afinar_method_type(pref_server, files):
    client = pref_server.client()
    job = client.fine_tuning.jobs.create(
        training_file=files[1].id, model="tiny",
        method={"type": "orpo", "orpo": {"hyperparameters": {"lambda": 0.2, "n_epochs": 1}}})
    job = wait_for(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "orpo" and job.hyperparameters.n_epochs == 1


def test_dpo_on_sft_data_fails_validation_naming_the_format(pref_server, files):
    client = pref_server.client()
    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=files[0].id, model="tiny", method={"type": "dpo"}).id)
    assert job.status == "failed" and job.error.code == "invalid_training_file"
    assert "preference pairs" in job.error.message and "chat format" in job.error.message


@pytest.mark.parametrize("kwargs,param,words", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "between 1 and 50"),
    ({"hyperparameters": {"batch_size": 2.5}}, "hyperparameters.batch_size", "an integer"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 5}}}},
     "method.dpo.hyperparameters.beta", "between"),
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {
        "learning_rate_multiplier": -1}}}},
     "method.supervised.hyperparameters.learning_rate_multiplier", "between"),
    ({"method": {"type": "dpo", "supervised": {"hyperparameters": {"n_epochs": 2}}}},
     "method.supervised", "method.type is 'dpo'"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"betta": 0.1}}}},
     "method.dpo.hyperparameters.betta", "unknown parameter"),
    ({"method": {"type": "dpo", "dpo": {"hyperparams": {}}}}, "method.dpo.hyperparams",
     "unknown parameter"),
    ({"method": {"type": "reinforcement"}}, "method.type", "not supported"),
])
def test_bad_methods_and_hyperparameters_are_400s_naming_the_field(pref_server, files, kwargs,
                                                                   param, words):
    client = pref_server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(training_file=files[1].id, model="tiny", **kwargs)
    assert info.value.body["param"] == param
    assert words in info.value.body["message"]
    assert not [j for j in client.fine_tuning.jobs.list(limit=100) if j.status == "queued"]
