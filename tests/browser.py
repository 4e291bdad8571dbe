"""Fixtures of the dashboard's browser tests: a server with the tiny model, and a Chromium
page on it (Debian's chromium driven by Playwright) that fails the test on any console error
or any request leaving that server."""

from __future__ import annotations

import os
import shutil

import pytest

from serving import make_server

CHROMIUM = os.environ.get("AFINAR_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def dash(tmp_path_factory, tiny_model_dir):
    # No held-out split: early stopping could otherwise end the long job of the pause/cancel
    # test on its own between two clicks (it did, once, on a slower CI machine).
    srv = make_server(tmp_path_factory.mktemp("dash"), tiny_model_dir,
                      held_out_fraction=0).start()
    yield srv
    srv.stop()


@pytest.fixture
def page(dash):
    if not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: scripts/test.sh installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    root = dash.url.removesuffix("/v1")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            # The page's CSP forbids eval; Playwright's waits evaluate their predicates.
            tab = browser.new_page(viewport={"width": 1280, "height": 900}, bypass_csp=True)
            tab.errors, tab.foreign = [], []
            tab.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))
            tab.on("pageerror", lambda e: tab.errors.append(str(e)))
            tab.on("request", lambda r: r.url.startswith(root) or tab.foreign.append(r.url))
            tab.root = root
            yield tab
            assert tab.errors == [] and tab.foreign == []
        finally:
            browser.close()
