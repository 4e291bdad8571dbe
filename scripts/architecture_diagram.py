"""Draws afinar's layers and the imports between them, from the code, as a Mermaid chart.

    .venv/bin/python scripts/architecture_diagram.py            # print it
    .venv/bin/python scripts/architecture_diagram.py --write    # refresh docs/architecture.md

The layers are the import-linter contract's (pyproject.toml); the arrows are the imports grimp
finds between them (one arrow per pair of layers that import each other directly, the importer
above), leaving out the foundation every layer may use (FOUNDATION). tests/test_architecture.py fails when docs/architecture.md's chart is not this output.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
FOUNDATION = {"config", "console", "rundir", "events", "paths", "errors"}
START, END = "<!-- diagram: scripts/architecture_diagram.py -->", "<!-- end of diagram -->"


def layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contract = next(c for c in config["tool"]["importlinter"]["contracts"]
                    if c["type"] == "layers")
    return [[name.strip() for name in layer.replace(":", "|").split("|")]
            for layer in contract["layers"]]


def chart() -> str:
    import grimp

    graph = grimp.build_graph("afinar")
    levels = layers()
    level_of = {name: k for k, layer in enumerate(levels) for name in layer}

    def owner(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in level_of else None
    edges = set()
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = owner(module), owner(imported)
            if a and b and a != b and b not in FOUNDATION:
                edges.add((a, b))
    lines = ["```mermaid", "flowchart TD"]
    for k, layer in enumerate(levels):
        if set(layer) <= FOUNDATION:
            continue
        lines.append(f"  subgraph L{k} [\"layer {k}\"]")
        lines += [f"    {name}[{name}]" for name in layer]
        lines.append("  end")
    lines += [f"  {a} --> {b}" for a, b in sorted(edges, key=lambda e: (level_of[e[0]], e))]
    lines.append("```")
    return "\n".join(lines)


def current_doc_chart() -> str | None:
    text = DOC.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main(argv: list[str]) -> int:
    drawn = chart()
    if "--write" not in argv:
        print(drawn)
        return 0
    text = DOC.read_text(encoding="utf-8")
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    DOC.write_text(f"{before}{START}\n{drawn}\n{END}{after}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
