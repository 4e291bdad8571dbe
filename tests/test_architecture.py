"""The code's shape, checked like its behaviour: layers that only point down and no import circle
between the modules of one package (the import-linter contracts in pyproject.toml, drawn in
docs/architecture.md), and no module reaching into another's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "afinar"


def test_the_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("afinar"):
                found += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_")]
    assert not found, "\n".join(found)


def test_the_architecture_chart_is_drawn_from_the_current_code():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import architecture_diagram
    finally:
        sys.path.pop(0)
    assert architecture_diagram.current_doc_chart() == architecture_diagram.chart(), (
        "docs/architecture.md's chart is stale: run scripts/architecture_diagram.py --write")
