"""Renders Ollama TEMPLATEs with Go's text/template (render.go beside this file), for tests.

    texts = render_with_go(go_template(pieces), [ollama_values(conversation, system=None)])

Go comes from Debian's golang package (scripts/install_go.sh, run by scripts/test.sh); without
a go command the calling test is skipped, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from afinar.export.ollama import ollama_messages

RENDER_GO = Path(__file__).with_name("render.go")


def ollama_values(messages: list[dict], system: str | None = None) -> dict:
    """What Ollama gives a chat TEMPLATE for `messages` with Modelfile SYSTEM `system`."""
    all_system, merged = ollama_messages(messages, system)
    return {"System": all_system,
            "Messages": [{"Role": m["role"], "Content": m["content"]} for m in merged]}


def render_with_go(template: str, cases: list[dict]) -> list[str]:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no `go` command: scripts/install_go.sh installs Debian's golang, which "
                    "renders the Ollama TEMPLATE with Go's own text/template")
    with tempfile.TemporaryDirectory(prefix="afinar-go-") as scratch:
        folder = Path(scratch)
        (folder / "template.txt").write_text(template, encoding="utf-8")
        (folder / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
        # A build cache of its own when HOME has none (CI users without a home directory);
        # GOFLAGS/GO111MODULE: one file, standard library only, no module download.
        env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": ""}
        env.setdefault("GOCACHE", str(Path(tempfile.gettempdir()) / "afinar-go-cache"))
        done = subprocess.run([go, "run", str(RENDER_GO), str(folder / "template.txt"),
                               str(folder / "cases.json")], capture_output=True, text=True,
                              env=env, timeout=300)
    assert done.returncode == 0, f"go could not render the TEMPLATE: {done.stderr}"
    return json.loads(done.stdout)
