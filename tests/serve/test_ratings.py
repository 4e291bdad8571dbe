"""Ratings (the Rate page's API): the rules that turn blind A/B votes into preference pairs,
then a real `afinar serve`: strict 400s, the list and its tally, both export formats checked by
afinar's own validator, a real tiny job's held-out prompts, and an export a DPO job trains on."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from serving import chat_records, make_server, raw, wait_for
from afinar.data.validate import load_examples
from afinar.serve import ratings

PROMPT = [{"role": "system", "content": "Clasifica."}, {"role": "user", "content": "pedido roto"}]


def _rating(verdict, ideal=None, a="Categoría: envío", b="lo siento", **extra):
    return {"messages": PROMPT, "model_a": "tiny", "model_b": "ft:tiny:afinar::x",
            "answer_a": a, "answer_b": b, "left": "b", "verdict": verdict, "ideal": ideal,
            **extra}


# --- the pair rules -----------------------------------------------------------------------------

@pytest.mark.parametrize("verdict, ideal, pairs", [
    ("a", None, [("Categoría: envío", "lo siento")]),
    ("b", None, [("lo siento", "Categoría: envío")]),
    ("a", "Ideal.", [("Ideal.", "lo siento")]),  # the ideal replaces the winner, the loser stays
    ("both_bad", "Ideal.", [("Ideal.", "Categoría: envío"), ("Ideal.", "lo siento")]),
    ("tie", "Ideal.", [("Ideal.", "Categoría: envío"), ("Ideal.", "lo siento")]),
    ("tie", None, []), ("both_bad", "   ", []),  # a blank ideal is no ideal
])
def test_a_vote_gives_the_pairs_it_implies(verdict, ideal, pairs):
    assert ratings.pairs_of(_rating(verdict, ideal))[0] == pairs


def test_pairs_that_would_teach_nothing_are_skipped_and_counted():
    skipped = ratings.export([
        _rating("a", a="same ", b=" same"),               # equal after strip
        _rating("both_bad", ideal="lo siento"),           # the ideal equals answer b
        _rating("b", b=""),                               # an empty winner
        _rating("tie"), _rating("both_bad"), _rating("a")], "openai")
    assert skipped.pairs == 2 and skipped.ratings == 6
    assert skipped.skipped == {"chosen and rejected are the same text": 2, "an empty answer": 1,
                               "tie without an ideal answer": 1,
                               "both bad without an ideal answer": 1}
    assert "2 × chosen and rejected" in ratings.no_pairs_message(skipped)


@pytest.mark.parametrize("fmt, detected", [("openai", "dpo"), ("preference", "preference")])
def test_both_export_formats_pass_afinars_validator(tmp_path, fmt, detected):
    votes = [_rating("a" if i % 2 else "b", a=f"Categoría: envío {i}", b=f"lo siento {i}")
             for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text(ratings.export(votes, fmt).text(), encoding="utf-8")
    report = load_examples(path)
    assert report.errors == [] and report.format == detected and len(report.examples) == 12
    first = report.examples[0]  # the prompt keeps its system turn; b won the first vote
    assert first.system_prompt == "Clasifica." and first.final_answer() == "lo siento 0"
    assert first.rejected == "Categoría: envío 0"


def test_the_tally_counts_each_model_per_vote():
    tally = ratings.tally([_rating("a"), _rating("b"), _rating("tie"), _rating("both_bad")])
    assert tally["tiny"] == {"votes": 4, "wins": 1, "losses": 1, "ties": 1, "both_bad": 1}


# --- the API on a real server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def rate_server(tmp_path_factory, tiny_model_dir):
    srv = make_server(tmp_path_factory.mktemp("serve-ratings"), tiny_model_dir,
                      held_out_fraction=0.25).start()
    yield srv
    srv.stop()


def _call(srv, method, path, body=None):
    status, data = raw(method, srv.url + path, None if body is None else json.dumps(body).encode(),
                       key="sk-x", headers={"Content-Type": "application/json"})
    return status, data


def _json(srv, method, path, body=None):
    status, data = _call(srv, method, path, body)
    return status, json.loads(data)


def test_a_vote_with_a_wrong_field_is_a_400_naming_it(rate_server):
    good = _rating("a", source="typed")
    for change, param in [({"verdict": "c"}, "verdict"), ({"left": "middle"}, "left"),
                          ({"answer_b": None}, "answer_b"), ({"winner": "a"}, "winner"),
                          ({"source": "somewhere"}, "source"), ({"model_a": ""}, "model_a"),
                          ({"messages": []}, "messages"),
                          ({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "hello"}]}, "messages"),
                          ({"messages": [{"role": "user", "content": " "}]},
                           "messages.[0].content"),
                          ({"messages": [{"role": "robot", "content": "hi"}]},
                           "messages.[0].role")]:
        status, body = _json(rate_server, "POST", "/ratings", {**good, **change})
        assert status == 400 and body["error"]["param"] == param, (change, body)
        assert param.split(".")[0] in body["error"]["message"]
    assert _json(rate_server, "GET", "/ratings")[1]["data"] == []  # nothing was stored


def test_no_pair_no_file_and_too_few_pairs_for_a_job(rate_server):
    assert _json(rate_server, "POST", "/ratings", _rating("tie"))[0] == 200
    status, body = _json(rate_server, "POST", "/ratings/export", {"format": "openai"})
    assert status == 400 and body["error"]["code"] == "no_preference_pairs"
    assert "1 × tie without an ideal answer" in body["error"]["message"]
    assert _json(rate_server, "POST", "/ratings", _rating("a"))[0] == 200
    status, body = _json(rate_server, "POST", "/ratings/export", {"format": "openai"})
    assert status == 400 and body["error"]["code"] == "invalid_export"
    assert "only 1 usable examples; at least 10" in body["error"]["message"]
    assert _json(rate_server, "POST", "/ratings/export", {"format": "csv"})[0] == 400


def test_votes_list_newest_first_with_a_tally_and_export_in_both_formats(rate_server, tmp_path):
    for i in range(11):
        status, rating = _json(rate_server, "POST", "/ratings", _rating(
            "b" if i % 3 else "a", a=f"Categoría: envío {i}", b=f"lo siento {i}",
            ideal="" if i else None, source="held-out:ftjob-abc123"))
        assert status == 200 and rating["id"].startswith("rating-")
    assert rating["ideal"] is None and rating["winner"] == "ft:tiny:afinar::x"
    assert rating["messages"] == PROMPT and rating["left"] == "b"
    status, page = _json(rate_server, "GET", "/ratings?limit=5")
    assert status == 200 and page["has_more"] and len(page["data"]) == 5
    assert page["data"][0]["id"] == rating["id"]  # newest first
    status, rest = _json(rate_server, "GET", f"/ratings?limit=100&after={page['last_id']}")
    assert len(rest["data"]) == 13 - 5 and not rest["has_more"]
    summary = page["summary"]
    assert summary["votes"] == 13 and summary["models"]["tiny"]["wins"] == 1 + 4
    assert summary["export"] == {"ratings": 13, "pairs": 12,
                                 "skipped": {"tie without an ideal answer": 1}}
    for fmt, detected in (("openai", "dpo"), ("preference", "preference")):
        status, data = raw("GET", rate_server.url + f"/ratings/export?format={fmt}")
        assert status == 200
        path = tmp_path / f"{fmt}.jsonl"
        path.write_bytes(data)
        report = load_examples(path)
        assert report.errors == [] and report.format == detected
        assert len(report.examples) == 12
    status, headers = _headers(rate_server.url + "/ratings/export?format=preference")
    assert headers["content-type"].startswith("application/jsonl")
    assert 'filename="ratings-preference.jsonl"' in headers["content-disposition"]
    assert headers["x-afinar-pairs"] == "12"
    assert headers["x-afinar-skipped"] == "1 tie without an ideal answer"


def _headers(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}


def test_an_exported_file_trains_a_dpo_job(rate_server):
    status, file = _json(rate_server, "POST", "/ratings/export", {"format": "openai"})
    assert status == 200 and file["purpose"] == "fine-tune" and file["object"] == "file"
    assert file["filename"] == "ratings-openai.jsonl" and file["export"]["pairs"] == 12
    status, check = _json(rate_server, "GET", f"/files/{file['id']}/validation")
    assert check["ok"] and check["format"] == "dpo"
    client = rate_server.client()
    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=file["id"], model="tiny",
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}}).id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo"


def test_the_held_out_prompts_of_a_real_job(rate_server, tmp_path):
    client = rate_server.client()
    records = chat_records(12)
    records[0]["messages"].insert(0, {"role": "system", "content": "Clasifica el pedido."})
    data = client.files.create(file=open(write_jsonl(tmp_path / "t.jsonl", records), "rb"),
                               purpose="fine-tune")
    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=data.id, model="tiny", hyperparameters={"n_epochs": 1}).id)
    assert job.status == "succeeded", job.error
    status, prompts = _json(rate_server, "GET", f"/ratings/prompts?job={job.id}")
    assert status == 200 and prompts["job"] == job.id and "25% held out" in prompts["split"]
    assert len(prompts["data"]) == 3  # ceil(12 × 0.25), as training held them out
    for prompt in prompts["data"]:
        record = records[prompt["line"] - 1]["messages"]
        assert prompt["messages"] == record[:-1]  # all but the final answer, system included
        assert prompt["reference"] == record[-1]["content"]
    # A job whose training never started has no split yet; an unknown job is a 404.
    bad = client.files.create(file=open(write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}] * 12),
                                        "rb"), purpose="fine-tune")
    failed = wait_for(client, client.fine_tuning.jobs.create(training_file=bad.id,
                                                             model="tiny").id)
    status, body = _json(rate_server, "GET", f"/ratings/prompts?job={failed.id}")
    assert status == 400 and "has not started training" in body["error"]["message"]
    status, body = _json(rate_server, "GET", "/ratings/prompts?job=ftjob-nope")
    assert status == 404 and body["error"]["param"] == "fine_tuning_job_id"
    assert _json(rate_server, "GET", "/ratings/prompts")[0] == 400
