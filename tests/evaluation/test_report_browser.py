"""report.html opened in a real headless Chromium (Debian's `chromium`, driven by Playwright;
scripts/test.sh installs the browser; nothing is downloaded by Playwright)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

CHROMIUM = os.environ.get("AFINAR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_report_renders_chart_and_tables(evaluated_run, tmp_path):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: scripts/test.sh installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    result, _ = evaluated_run
    report = json.loads((result.run_dir / "report.json").read_text())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((result.run_dir / "report.html").as_uri())
            chart = page.locator("svg.chart").bounding_box()
            assert chart["width"] > 300 and chart["height"] > 150
            # Both curves are drawn with real extent, and one dot per held-out evaluation.
            for series in ("train", "held-out"):
                box = page.locator(f"svg.chart polyline.{series}").bounding_box()
                assert box["width"] > 100, series
            n_evals = len(report["training"]["curves"]["eval_loss"])
            assert page.locator("svg.chart circle").count() == n_evals
            assert page.locator("svg.chart line.best").count() == 1
            assert page.locator("table.metrics tr").count() == len(report["metrics"]) + 1
            assert page.locator("tr.example").count() == len(report["examples"])
            assert page.locator("tr.probe").count() == 24
            text = page.locator("table.metrics").inner_text()
            assert "held-out loss" in text and "check: always" in text
            assert "Diagnosis" in page.locator("#training").inner_text()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
        finally:
            browser.close()
