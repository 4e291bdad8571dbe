"""afinar's `settings` extension of job creation, through the real OpenAI SDK's extra_body
against a real server: any typed-config setting by dotted name, checked at creation (400s
naming the setting), frozen in the run's config."""

from __future__ import annotations

import openai
import pytest
import yaml

from conftest import write_jsonl
from serving import chat_records, wait_for


@pytest.fixture(scope="module")
def training_file(server, tmp_path_factory):
    data = write_jsonl(tmp_path_factory.mktemp("settings") / "t.jsonl", chat_records(12))
    return server.client().files.create(file=open(data, "rb"), purpose="fine-tune").id


def test_settings_reach_the_run_config(client, server, training_file):
    job = client.fine_tuning.jobs.create(
        training_file=training_file, model="tiny", hyperparameters={"n_epochs": 1},
        extra_body={"settings": {"lora.r": 4, "lora": {"alpha": 8}, "max_seq_length": 64,
                                 "lr_scheduler": "constant"}})
    assert job.model_extra["settings"] == {"lora": {"r": 4, "alpha": 8}, "max_seq_length": 64,
                                           "lr_scheduler": "constant"}
    done = wait_for(client, job.id)
    assert done.status == "succeeded", done.error
    frozen = yaml.safe_load(client.get(f"/fine_tuning/jobs/{job.id}/config",
                                       cast_to=object)["config"])
    assert frozen["lora"]["r"] == 4 and frozen["lora"]["alpha"] == 8
    assert frozen["max_seq_length"] == 64 and frozen["lr_scheduler"] == "constant"
    assert frozen["epochs"] == 1  # the OpenAI hyperparameter, alongside


@pytest.mark.parametrize("settings, message", [
    ({"lora.rank": 4}, "settings: lora.rank: unknown setting (did you mean lora.r?)"),
    ({"lora.r": 0}, "settings: lora.r: Input should be greater than or equal to 1"),
    ({"epochs": 2}, "settings.epochs: set by the job itself; use hyperparameters.n_epochs."),
    ({"data": "/etc/passwd"}, "settings.data: set by the job itself; use training_file."),
    ({"checks": "/srv/x.yaml"}, "settings.checks: set by the job itself (the server decides"),
    ({"precision": "fp64"}, "settings: precision: Input should be 'auto', 'fp32'"),
])
def test_bad_settings_are_400s_naming_the_setting(client, training_file, settings, message):
    with pytest.raises(openai.BadRequestError) as caught:
        client.fine_tuning.jobs.create(training_file=training_file, model="tiny",
                                       extra_body={"settings": settings})
    assert caught.value.body["message"].startswith(message), caught.value.body["message"]


def test_the_settings_help_lists_every_open_setting(client):
    help = client.get("/fine_tuning/jobs/settings", cast_to=object)
    names = {item["name"]: item for item in help["settings"]}
    assert names["lora.r"]["default"] == 16 and "Rank" in names["lora.r"]["description"]
    assert names["precision"]["choices"] == ["auto", "fp32", "bf16", "fp16"]
    assert "data" not in names and "epochs" not in names and "checks" not in names
