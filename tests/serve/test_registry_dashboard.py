"""The registry through the server (/v1/registry) and the dashboard's Models, version and
Compare pages, against a real `afinar serve` whose AFINAR_HOME (hence registry) is its own:
two CLI runs of the tiny model (one evaluated) and one run trained by a job."""

from __future__ import annotations

import json
import time

import pytest

from conftest import write_jsonl
from serving import chat_records, make_server, raw, wait_for


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory, evaluated_run, tiny_model_dir):
    """A registry holding the shared evaluated run (v1) and a second run with other settings
    (v2), trained here for 6 steps."""
    from afinar.config import TrainConfig
    from afinar.pipeline import fine_tune
    from afinar.versions import open_registry

    home = tmp_path_factory.mktemp("registry-home")
    result, folder = evaluated_run
    other = fine_tune(TrainConfig(data=str(folder / "small.jsonl"), model=str(tiny_model_dir),
                              output=str(home / "runs" / "other"), learning_rate=3e-3,
                              batch_size=2, max_steps=6, eval_steps=3, seed=1, precision="fp32",
                              evaluate=False))
    with open_registry(home / "registry.db") as registry:
        registry.record_run(result.run_dir)
        registry.record_run(other.run_dir)
    return home


@pytest.fixture(scope="module")
def dash(tmp_path_factory, tiny_model_dir, registry_home):
    srv = make_server(tmp_path_factory.mktemp("dash-registry"), tiny_model_dir)
    srv.start(env={"AFINAR_HOME": str(registry_home)})
    yield srv
    srv.stop()


def _get(srv, path):
    status, body = raw("GET", srv.url + path)
    return status, json.loads(body) if body.startswith(b"{") else body


def _post(srv, path, payload):
    status, body = raw("POST", srv.url + path, body=json.dumps(payload).encode(),
                       headers={"Content-Type": "application/json"})
    return status, json.loads(body)


def test_versions_lineage_report_tags_and_compare(dash, tmp_path):
    status, listed = _get(dash, "/registry/versions")
    assert status == 200 and [v["id"] for v in listed["data"]] == ["v2", "v1"]
    assert listed["data"][1]["evaluated"] and not listed["data"][0]["evaluated"]

    status, v1 = _get(dash, "/registry/versions/v1")
    assert status == 200 and v1["lineage"]["job"] is None  # trained by the CLI
    assert [c["step"] for c in v1["lineage"]["checkpoints"]]  # its step checkpoints
    assert "learning_rate" in v1["config"]
    status, report = _get(dash, "/registry/versions/v1/report")
    assert status == 200 and {m["name"] for m in report["metrics"]} >= {"eval_loss"}
    status, html = raw("GET", dash.url + "/registry/versions/v1/report.html")
    assert status == 200 and b"<html" in html[:200].lower()
    status, error = _get(dash, "/registry/versions/v2/report")
    assert status == 404 and "afinar eval v2" in error["error"]["message"]
    assert _get(dash, "/registry/versions/v9")[0] == 404

    assert _post(dash, "/registry/versions/v2/tags", {"tag": "candidate"})[1]["tags"] == [
        "candidate"]
    assert _post(dash, "/registry/versions/v2/tags", {"tag": "v3"})[0] == 400  # looks like an id
    assert _get(dash, "/registry/versions/candidate")[1]["id"] == "v2"
    assert raw("DELETE", dash.url + "/registry/tags/candidate")[0] == 200
    assert raw("DELETE", dash.url + "/registry/tags/candidate")[0] == 404

    status, compared = _get(dash, "/registry/compare?versions=v1,v2")
    assert status == 200 and [v["id"] for v in compared["versions"]] == ["v1", "v2"]
    diff = {row["setting"]: row["values"] for row in compared["config_diff"]}
    assert diff["learning_rate"] == [0.01, 0.003] and diff["max_steps"] == [30, 6]
    assert "model" not in diff  # the same in both: a diff shows only what differs
    assert len(compared["curves"]["v1"]["train"]) == 30
    assert len(compared["curves"]["v2"]["eval"]) >= 2
    rows = {row["metric"]: row for row in compared["metrics"]}
    assert rows["best_eval_loss"]["better"] == "lower"
    assert _get(dash, "/registry/compare?versions=v1")[0] == 400

    # A job's run is registered by the training itself, with the job in its lineage.
    client = dash.client()
    data = write_jsonl(tmp_path / "t.jsonl", chat_records(12))
    file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=file.id, model="tiny", hyperparameters={"n_epochs": 1}).id)
    assert job.status == "succeeded", job.error
    newest = _get(dash, "/registry/versions")[1]["data"][0]
    assert newest["job"] == job.id and newest["fine_tuned_model"] == job.fine_tuned_model
    lineage = _get(dash, f"/registry/versions/{newest['id']}")[1]["lineage"]
    assert lineage["job"] == job.id and lineage["checkpoints"][0]["model"].startswith(
        job.fine_tuned_model + ":ckpt-step-")


def test_an_export_runs_verifies_and_reports_its_result(dash):
    assert _post(dash, "/registry/versions/v1/exports", {"format": "onnx"})[0] == 400
    assert _post(dash, "/registry/versions/v1/exports", {"format": "merged", "x": 1})[0] == 400
    status, started = _post(dash, "/registry/versions/v1/exports", {"format": "merged"})
    assert status == 200 and started["status"] == "running"
    deadline = time.monotonic() + 300
    while (x := _get(dash, "/registry/exports/" + started["id"])[1])["status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert x["status"] == "succeeded", x["error"]
    assert x["result"]["verification"]["passed"] is True
    assert x["result"]["verification"]["identical_answers"] == x["result"]["verification"][
        "prompts"]
    assert "model.safetensors" in x["result"]["files"]
    assert [e["id"] for e in _get(dash, "/registry/versions/v1")[1]["exports"]] == [x["id"]]
    assert _get(dash, "/registry/exports/export-nothere")[0] == 404


def test_models_version_and_compare_pages(page, dash):
    page.goto(page.root + "/#/models")
    page.wait_for_selector("tr.version")
    assert page.locator("tr.version").count() >= 2
    page.click("text=v1")
    page.wait_for_selector("#lineage")
    assert "afinar train (CLI)" in page.inner_text("#lineage")
    listed = page.inner_text("#version-checkpoints")
    assert listed.startswith("checkpoints: step ") and "http" not in listed
    assert "eval_loss" in page.inner_text("#report")
    page.fill("#new-tag", "prod")
    page.click("#tag-form button")
    page.wait_for_function("document.querySelector('.tags').textContent.includes('prod')")

    page.goto(page.root + "/#/compare")
    page.wait_for_selector("#compare-go")
    for box in page.locator("input[name=version]").all():
        box.set_checked(box.get_attribute("value") in ("v1", "v2"))
    page.click("#compare-go")
    page.wait_for_selector("#config-diff")
    assert "learning_rate" in page.inner_text("#config-diff")
    assert page.locator("svg.chart polyline").count() == 4  # training + held-out, per version
    assert page.locator("#compare-metrics td.best").count() >= 1
