"""Screenshots of every dashboard page on the embedded model, into docs/dashboard/*.png.

    .venv/bin/python docs/dashboard/screenshots.py [--out docs/dashboard]

Starts a real `afinar serve` on 127.0.0.1 (state and registry in a temporary folder; the
converted embedded model is reused from AFINAR_HOME), uploads the bundled
examples/respuestas-breves/sft.jsonl, trains two short jobs on SmolLM2-135M-Instruct (one epoch
at LoRA r 16, two at r 8; each evaluated at its end), exports one with verification, and
photographs each page in Debian's Chromium through Playwright (as the browser tests do; nothing
is downloaded). About 15 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from afinar.paths import models_cache

ROOT = Path(__file__).resolve().parents[2]
AFINAR = str(Path(sys.executable).parent / "afinar")
CHROMIUM = os.environ.get("AFINAR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
DATA = ROOT / "examples" / "respuestas-breves" / "sft.jsonl"
BAD = '{"messages": [{"role": "usuario", "content": "hola"}]}\n'


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("afinar serve exited; see its log")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("afinar serve did not start")


def _wait_job(client, job_id: str, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while client.fine_tuning.jobs.retrieve(job_id).status not in ("succeeded", "failed",
                                                                    "cancelled"):
        if time.monotonic() > deadline:
            raise SystemExit(f"{job_id} did not finish")
        time.sleep(2)


def page_versions(client, root: str) -> list[str]:
    """The registry's version ids (newest first), through the API the Compare page uses."""
    return [v["id"] for v in client.get("/registry/versions", cast_to=object)["data"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    from openai import OpenAI
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="afinar-shots-") as tmp:
        port = _port()
        config = Path(tmp) / "serve.yaml"
        config.write_text(yaml.safe_dump({"home": str(Path(tmp) / "state"),
                                          "evaluate_jobs": True}))
        log = open(Path(tmp) / "serve.log", "wb")
        home = Path(tmp) / "home"  # a registry of this script's runs only
        home.mkdir()
        if models_cache().is_dir():
            (home / "models").symlink_to(models_cache())
        proc = subprocess.Popen([AFINAR, "serve", "--config", str(config), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "AFINAR_HOME": str(home)})
        root = f"http://127.0.0.1:{port}"
        try:
            _wait_http(root + "/", proc)
            client = OpenAI(base_url=root + "/v1", api_key="local", max_retries=0)
            file = client.files.create(file=open(DATA, "rb"), purpose="fine-tune")
            job = client.fine_tuning.jobs.create(training_file=file.id,
                                                 model="smollm2-135m-instruct",
                                                 suffix="breves", hyperparameters={"n_epochs": 1})
            other = client.fine_tuning.jobs.create(
                training_file=file.id, model="smollm2-135m-instruct", suffix="breves-r8",
                hyperparameters={"n_epochs": 2}, extra_body={"settings": {"lora.r": 8}})
            bad = Path(tmp) / "con-errores.jsonl"
            bad.write_text(DATA.read_text(encoding="utf-8").splitlines()[0] + "\n" + BAD * 2,
                           encoding="utf-8")
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900},
                                        bypass_csp=True)

                def shot(name: str) -> None:
                    page.screenshot(path=str(args.out / f"{name}.png"), full_page=True)
                    print(f"wrote {args.out / name}.png", flush=True)

                page.goto(root + "/#/data")
                page.set_input_files("#file", str(bad))
                page.wait_for_selector("#verdict")
                shot("data-errors")
                page.set_input_files("#file", str(DATA))
                page.wait_for_function("(document.querySelector('#verdict') || "
                                       "{textContent: ''}).textContent.includes('sft.jsonl')")
                shot("data")
                page.goto(root + "/#/new")
                page.wait_for_selector("#new-job")
                page.select_option("#job-method", "dpo")
                page.fill("#job-n_epochs", "2")
                page.click("#advanced summary")
                page.fill("[data-setting='lora.r']", "8")
                shot("new-job")
                page.goto(root + "/#/jobs/" + job.id)
                page.wait_for_function("document.querySelectorAll('circle.train').length >= 3",
                                       timeout=600_000)
                shot("job-running")
                page.wait_for_function("(document.querySelector('#job-status') || {})"
                                       ".textContent === 'succeeded'", timeout=900_000)
                shot("job")
                page.goto(root + "/#/jobs")
                page.wait_for_selector("tr.job")
                shot("jobs")
                _wait_job(client, other.id)
                page.goto(root + "/#/models")
                page.wait_for_selector("tr.version")
                shot("models")
                version = page.locator("tr.version td:first-child a").last.inner_text()  # v1
                page.goto(root + "/#/models/" + version)
                page.wait_for_selector("#report table")
                page.select_option("#export-format", "merged")
                page.click("#export-start")
                page.wait_for_function("document.querySelector('tr.export') && "
                                       "!document.querySelector('tr.export.running')",
                                       timeout=900_000)
                shot("version")
                page.goto(root + "/#/compare/" + ",".join(
                    page_versions(client, root)))
                page.wait_for_selector("#compare-metrics")
                shot("compare")
                finished = client.fine_tuning.jobs.retrieve(job.id)
                page.goto(root + "/#/playground")
                page.wait_for_selector("#run")
                for box in page.locator("input[name=model]").all():
                    box.set_checked(box.get_attribute("value") in (
                        "smollm2-135m-instruct", finished.fine_tuned_model))
                page.fill("#system", "Eres el asistente de las Bibliotecas de Valdemar. Responde "
                          "con una sola frase breve que empiece por «Respuesta:».")
                page.fill("#prompt", "¿Puedo llevarme revistas en préstamo?")
                page.fill("#max-tokens", "48")
                page.click("#run")
                page.wait_for_function("!document.querySelector('#run').disabled",
                                       timeout=300_000)
                shot("playground")
                page.goto(root + "/#/rate")
                page.wait_for_selector("#tally")
                page.select_option("#model-a", "smollm2-135m-instruct")
                page.select_option("#model-b", finished.fine_tuned_model)
                page.fill("#system", "Eres el asistente de las Bibliotecas de Valdemar. Responde "
                          "con una sola frase breve que empiece por «Respuesta:».")
                page.fill("#prompt", "¿Hay wifi gratis en la biblioteca?")
                page.fill("#max-tokens", "48")
                page.click("#generate")
                page.wait_for_function("[...document.querySelectorAll('#answers .answer')]"
                                       ".every(a => a.textContent.trim().length > 0) && "
                                       "!document.querySelector('#generate').disabled",
                                       timeout=300_000)
                shot("rate")
                page.click("#rate-page")
                page.keyboard.press("b")
                page.wait_for_selector("#revealed p")
                shot("rate-revealed")
                browser.close()
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
