"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real
`afinar serve` with the tiny model: nothing leaves 127.0.0.1, no console errors, a bad upload
shows its line errors, a job's curve grows live, a reload re-attaches, pause/resume works."""

from __future__ import annotations

import json

from serving import chat_records, make_server

def _jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def test_a_bad_upload_shows_its_line_errors_and_a_good_one_its_examples(page, tmp_path):
    page.goto(page.root + "/#/data")
    page.select_option("#token-model", "tiny")  # tokens counted with the tiny model's tokenizer
    records = chat_records(12)
    records[2] = {"messages": [{"role": "asistente", "content": "x"}]}
    page.set_input_files("#file", str(_jsonl(tmp_path / "bad.jsonl", records)))
    page.wait_for_selector("#verdict")
    assert "not usable" in page.inner_text("#verdict")
    issues = page.locator("li.issue.error").all_inner_texts()
    assert any(t.startswith("line 3: messages[0].role: unknown role") for t in issues), issues
    page.set_input_files("#file", str(_jsonl(tmp_path / "good.jsonl", chat_records(12))))
    page.wait_for_function("(document.querySelector('#verdict') || {textContent: ''}).textContent.includes('good.jsonl')")
    assert "usable" in page.inner_text("#verdict") and page.locator(".issue.error").count() == 0
    assert page.locator(".bubble.assistant").count() == 12
    assert "tokens per example (tiny): min" in page.inner_text("#token-stats")
    assert "exact duplicates: 0" in page.inner_text("#duplicates")


def test_a_job_page_draws_its_curve_live_reattaches_and_pauses(page, dash, tmp_path):
    client = dash.client()
    # 10,000 steps: far more than the test lives, so only the page's buttons can end it.
    data = _jsonl(tmp_path / "train.jsonl", chat_records(200))
    uploaded = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=uploaded.id, model="tiny",
                                         hyperparameters={"n_epochs": 50, "batch_size": 1})
    page.goto(page.root + "/#/jobs/" + job.id)
    page.wait_for_function("document.querySelectorAll('circle.train').length >= 3",
                           timeout=120_000)
    # The points arrive over the server-sent event stream, not by polling.
    page.wait_for_function("(document.querySelector('#live') || {dataset: {}}).dataset.mode"
                           " === 'stream'")
    seen = page.locator("circle.train").count()
    page.wait_for_function(f"document.querySelectorAll('circle.train').length > {seen}")
    page.reload()  # the page holds no state: it attaches to the server's again
    page.wait_for_function(f"document.querySelectorAll('circle.train').length > {seen}")
    assert "learning_rate:" in page.text_content("#job-config pre")  # the frozen config
    page.click("#pause")
    page.wait_for_function("(document.querySelector('#job-status') || {}).textContent === 'paused'",
                           timeout=60_000)
    page.click("#resume")
    page.wait_for_function("['queued', 'running'].includes("
                           "(document.querySelector('#job-status') || {}).textContent)")
    page.click("#cancel")
    page.wait_for_function("(document.querySelector('#job-status') || {}).textContent === 'cancelled'",
                           timeout=60_000)
    # Each saved checkpoint is listed, and links to the playground with it chosen.
    page.wait_for_selector("li.checkpoint")
    assert ":ckpt-step-" in page.inner_text("ul.checkpoints")
    page.goto(page.root + "/#/jobs")
    page.wait_for_selector("tr.job")
    assert job.id in page.inner_text("table.jobs")


def test_the_shell_is_public_but_the_data_needs_the_key(tmp_path_factory, tiny_model_dir):
    from serving import raw

    srv = make_server(tmp_path_factory.mktemp("dash-keys"), tiny_model_dir,
                      api_keys=["sk-dash"]).start()
    try:
        root = srv.url.removesuffix("/v1")
        status, body = raw("GET", root + "/")
        assert status == 200 and b"/ui/app.js" in body
        assert raw("GET", root + "/ui/app.js")[0] == 200
        assert raw("GET", root + "/ui/../serve.yaml")[0] == 404
        assert raw("GET", srv.url + "/fine_tuning/jobs")[0] == 401
        assert raw("GET", srv.url + "/fine_tuning/jobs", key="sk-dash")[0] == 200
    finally:
        srv.stop()


def test_the_playground_streams_two_models_side_by_side(page, dash, tmp_path):
    client = dash.client()
    data = _jsonl(tmp_path / "train.jsonl", chat_records(16))
    uploaded = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    from serving import wait_for

    job = wait_for(client, client.fine_tuning.jobs.create(
        training_file=uploaded.id, model="tiny", hyperparameters={"n_epochs": 1}).id)
    assert job.status == "succeeded", job.error
    page.goto(page.root + "/#/models")
    page.wait_for_selector("tr.model")
    assert job.fine_tuned_model in page.inner_text("table.models")
    page.goto(page.root + "/#/playground")
    page.wait_for_selector("#run")
    for box in page.locator("input[name=model]").all():
        box.set_checked(box.get_attribute("value") in ("tiny", job.fine_tuned_model))
    page.fill("#prompt", "pedido 3 llegó roto")
    page.fill("#max-tokens", "12")
    # Sampled: the random base model's greedy answer may be blank (on llama.cpp's bf16 weights
    # its near-flat logits pick "\n" twelve times), and the page shows a stripped answer.
    page.fill("#temperature", "1")
    page.click("#run")
    page.wait_for_function("document.querySelectorAll('.column .answer').length === 2 && "
                           "[...document.querySelectorAll('.column .answer')]"
                           ".every(a => a.textContent.length > 0)")
    page.wait_for_function("!document.querySelector('#run').disabled")
    titles = page.locator(".column h3").all_inner_texts()
    assert sorted(titles) == sorted(["tiny", job.fine_tuned_model])


def test_a_new_job_from_the_page_with_help_and_equivalent_code(page, dash, tmp_path):
    client = dash.client()
    data = _jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"pedido {i}", "chosen": f"Prioridad: alta {i}", "rejected": f"lo siento {i}"}
        for i in range(16)])
    uploaded = client.files.create(file=open(data, "rb"), purpose="fine-tune")
    page.goto(page.root + "/#/new")
    page.wait_for_selector("#new-job")
    page.select_option("select[name=training_file]", uploaded.id)
    page.select_option("select[name=model]", "tiny")
    page.select_option("#job-method", "dpo")
    assert "Passes over the data" in page.inner_text("[data-for=n_epochs]")  # the config's text
    assert page.is_visible("[data-for=beta]") and not page.is_visible("[data-for=lambda]")
    page.fill("#job-n_epochs", "1")
    page.fill("#job-beta", "0.2")
    # Advanced: every other setting, with the typed config's description.
    page.click("#advanced summary")
    assert "Rank of the low-rank update" in page.inner_text("#advanced")
    page.fill("[data-setting='lora.r']", "8")
    page.select_option("[data-setting='lr_scheduler']", '"constant"')
    page.select_option("[data-setting='dpo.loss']", '"ipo"')
    code = page.inner_text("#equivalent")
    assert "afinar train --data FILE.jsonl --model tiny --method dpo --epochs 1" in code
    assert "--set dpo.beta=0.2" in code and "client.fine_tuning.jobs.create" in code
    assert "--set lora.r=8 --set dpo.loss=ipo --set lr_scheduler=constant" in code  # form order
    assert 'extra_body={"settings": {"lora.r":8,"dpo.loss":"ipo","lr_scheduler":"constant"}}' \
        in code
    page.click("#create")
    page.wait_for_function("location.hash.startsWith('#/jobs/ftjob-')")
    job_id = page.evaluate("location.hash.split('/')[2]")
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    assert job.model_extra["settings"] == {"lora": {"r": 8}, "lr_scheduler": "constant",
                                           "dpo": {"loss": "ipo"}}
    assert job.training_file == uploaded.id
