"""The Rate page in a real headless Chromium against a real `afinar serve`: two tiny models with
different weights answer a typed prompt blind, a keyboard vote is stored with the right winner
for the side it was shown on, an ideal answer makes two pairs, the downloaded JSONL passes
afinar's validator, and a DPO job starts from the votes."""

from __future__ import annotations

import json

import pytest

from conftest import build_tiny_model
from serving import make_server, raw
from afinar.data.validate import load_examples


@pytest.fixture(scope="module")
def dash(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    # A second tiny model with other random weights: at temperature 0 the same weights would
    # give the same answer twice, and a pair of equal answers teaches nothing.
    other = tmp_path_factory.mktemp("tiny-b")
    build_tiny_model(tiny_tokenizer, seed=1).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    srv = make_server(tmp_path_factory.mktemp("dash-rate"), tiny_model_dir,
                      models={"tiny": str(tiny_model_dir), "tiny-b": str(other)}).start()
    yield srv
    srv.stop()


def _ratings(dash):
    status, body = raw("GET", dash.url + "/ratings?limit=100", key="sk-x")
    assert status == 200
    return json.loads(body)


def _answers_ready(page):
    page.wait_for_function("document.querySelector('#rate-status').textContent"
                           ".startsWith('Which answer')", timeout=60_000)
    return page.inner_text("#answer-left"), page.inner_text("#answer-right")


def test_a_keyboard_vote_is_stored_and_its_export_validates(page, dash, tmp_path):
    # Ten earlier votes, so the export has enough pairs for a job.
    for i in range(10):
        raw("POST", dash.url + "/ratings", json.dumps({
            "messages": [{"role": "user", "content": f"pedido {i} llegó roto"}],
            "model_a": "tiny", "model_b": "tiny-b", "answer_a": f"Categoría: envío {i}",
            "answer_b": f"lo siento {i}", "left": "a", "verdict": "a"}).encode(), key="sk-x",
            headers={"Content-Type": "application/json"})
    page.goto(page.root + "/#/rate")
    page.wait_for_selector("#tally table")
    assert "a or 1 = Answer 1 is better" in page.inner_text("#rate-keys")
    page.select_option("#model-a", "tiny")
    page.select_option("#model-b", "tiny-b")
    page.fill("#prompt", "pedido 3 llegó roto")
    page.fill("#max-tokens", "8")
    # Sampled: greedy, these random tiny models only write newlines, and blank answers (which
    # afinar's validator refuses) are left out of the export.
    page.fill("#temperature", "1")
    page.click("#generate")
    left_text, right_text = _answers_ready(page)
    assert page.inner_text("#answer-left-title") == "Answer 1"  # no names before the vote
    page.keyboard.press("a")
    page.wait_for_selector("#revealed p")
    left_model = page.inner_text("#answer-left-title").removeprefix("Answer 1: ")
    right_model = page.inner_text("#answer-right-title").removeprefix("Answer 2: ")
    assert {left_model, right_model} == {"tiny", "tiny-b"}
    assert f"{left_model} wins" in page.inner_text("#revealed")
    rating = _ratings(dash)["data"][0]
    assert rating["winner"] == left_model and rating["model_" + rating["left"]] == left_model
    assert rating["verdict"] == rating["left"] and rating["source"] == "typed"
    side = {rating["left"]: left_text, "ab".replace(rating["left"], ""): right_text}
    assert (rating["answer_a"], rating["answer_b"]) == (side["a"], side["b"])
    assert rating["messages"] == [{"role": "user", "content": "pedido 3 llegó roto"}]
    page.wait_for_function("document.querySelector('#tally').textContent.includes('11 votes')")

    # Second vote: keys typed into the ideal answer box do not vote; x = both bad.
    page.keyboard.press("n")
    page.fill("#prompt", "pedido 7 llegó roto")
    page.fill("#system", "Clasifica el pedido.")
    page.click("#generate")
    _answers_ready(page)
    page.type("#ideal", "Categoría: envío tab x")
    assert _ratings(dash)["summary"]["votes"] == 11
    page.click("#rate-page")  # focus leaves the text box
    page.keyboard.press("x")
    page.wait_for_selector("#revealed p")
    rating = _ratings(dash)["data"][0]
    assert rating["verdict"] == "both_bad" and rating["ideal"] == "Categoría: envío tab x"
    assert rating["messages"][0] == {"role": "system", "content": "Clasifica el pedido."}
    page.wait_for_function("document.querySelector('#tally').textContent.includes('12 votes')")
    summary = _ratings(dash)["summary"]

    with page.expect_download() as download:
        page.click("#export-openai")
    path = tmp_path / "votes.jsonl"
    path.write_bytes(open(download.value.path(), "rb").read())
    report = load_examples(path)
    assert report.errors == [] and report.format == "dpo"
    # 10 earlier pairs, the first vote's and one per answer against the ideal answer.
    assert len(report.examples) == summary["export"]["pairs"] == 13, summary

    # The job's model defaults to the model the votes favour: tiny won the ten earlier votes.
    assert page.input_value("#job-model") == "tiny"
    page.click("#start-job")
    page.wait_for_function("location.hash.startsWith('#/jobs/ftjob-')", timeout=30_000)
    job_id = page.evaluate("location.hash.split('/')[2]")
    job = dash.client().fine_tuning.jobs.retrieve(job_id)
    assert job.method.type == "dpo" and job.model == "tiny"
    assert dash.client().files.retrieve(job.training_file).filename == "ratings-openai.jsonl"


def test_rating_a_jobs_held_out_prompts_one_after_another(page, dash, tmp_path):
    from conftest import write_jsonl
    from serving import chat_records, wait_for

    client = dash.client()
    data = client.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", chat_records(12)),
                                         "rb"), purpose="fine-tune")
    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=data.id, model="tiny", hyperparameters={"n_epochs": 1}).id)
    assert job.status == "succeeded", job.error
    held_out = json.loads(raw("GET", dash.url + f"/ratings/prompts?job={job.id}")[1])["data"]
    page.goto(page.root + "/#/rate")
    page.wait_for_selector("#tally")
    page.check("input[name=source][value=held-out]")
    page.select_option("#held-out-job", job.id)
    page.wait_for_selector("#held-out-prompt .example")
    assert f"held-out prompt 1 of {len(held_out)}" in page.inner_text("#held-out-prompt")
    assert not page.is_visible("#prompt")
    page.fill("#max-tokens", "4")
    page.fill("#temperature", "1")
    page.click("#generate")
    _answers_ready(page)
    page.keyboard.press("2")  # the right-hand answer wins
    page.wait_for_selector("#revealed p")
    right_model = page.inner_text("#answer-right-title").removeprefix("Answer 2: ")
    rating = _ratings(dash)["data"][0]
    assert rating["source"] == "held-out:" + job.id and rating["winner"] == right_model
    assert rating["verdict"] != rating["left"]
    assert rating["messages"] == held_out[0]["messages"]
    page.keyboard.press("n")  # the next held-out prompt, answered at once
    page.wait_for_function("document.querySelector('#held-out-prompt').textContent"
                           ".includes('held-out prompt 2 of')")
    _answers_ready(page)
