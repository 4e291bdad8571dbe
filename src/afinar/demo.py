"""The main job of the README: tune the embedded model on the bundled dataset, then compare.

    result = run_demo()      # trains, then answers held-out prompts with base and tuned models

Adherence is measured on every held-out triage prompt: the share of answers that match the
taught format exactly. Ordinary held-out prompts are checked for format leaking into them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from afinar.config import load_train_config
from afinar.data.split import split_examples
from afinar.data.validate import load_examples
from afinar.errors import AfinarError
from afinar.rundir import write_json_atomic
from afinar.infer.generate import GenerationSettings, load
from afinar.train.loop import train


def bundled_example(name: str = "soporte-triaje") -> Path:
    folder = Path(__file__).resolve().parents[2] / "examples" / name
    if not folder.is_dir():
        raise AfinarError(f"bundled example {name!r} not found at {folder}",
                          "the demo runs from an afinar source checkout")
    return folder


@dataclass
class DemoRow:
    prompt: str
    reference: str
    base: str
    tuned: str
    is_triage: bool


@dataclass
class DemoResult:
    run_dir: Path
    train_summary: dict
    rows: list[DemoRow] = field(default_factory=list)
    base_adherence: float = 0.0
    tuned_adherence: float = 0.0
    base_leak: float = 0.0
    tuned_leak: float = 0.0


def _share(answers: list[str], pattern: re.Pattern, full: bool) -> float:
    if not answers:
        return 0.0
    hits = [bool(pattern.fullmatch(a.strip()) if full else pattern.search(a)) for a in answers]
    return sum(hits) / len(hits)


def run_demo(output: str | None = None, on_event: Callable | None = None,
             notify: Callable = print, overrides: list[str] | None = None) -> DemoResult:
    folder = bundled_example()
    config = load_train_config(folder / "train.yaml", overrides, output=output)
    checks = yaml.safe_load((folder / "checks.yaml").read_text(encoding="utf-8"))
    fmt = re.compile(checks["format_regex"])
    leak = re.compile(checks["leak_regex"])

    result = train(config, on_event=on_event)

    # The same seeded split training used: these prompts were never trained on.
    examples = load_examples(config.data).examples
    _, held = split_examples(examples, config.held_out_fraction, config.seed)
    prompts = [list(ex.prompt_messages()) for ex in held]
    triage = [any(m.role == "system" and checks["scope_system_contains"] in m.content
                  for m in p) for p in prompts]
    settings = GenerationSettings(max_new_tokens=80)
    notify(f"Answering {len(prompts)} held-out prompts with the base model...")
    base_answers = load(config.model, notify=notify).generate(prompts, settings)
    notify("... and with the tuned model")
    tuned_answers = load(str(result.run_dir), notify=notify).generate(prompts, settings)

    rows = [DemoRow(p[-1].content, ex.final_answer() or "", b, t, tri)
            for p, ex, b, t, tri in zip(prompts, held, base_answers, tuned_answers, triage)]
    tri_base = [r.base for r in rows if r.is_triage]
    tri_tuned = [r.tuned for r in rows if r.is_triage]
    other_base = [r.base for r in rows if not r.is_triage]
    other_tuned = [r.tuned for r in rows if not r.is_triage]
    demo = DemoResult(
        result.run_dir, result.summary, rows,
        base_adherence=_share(tri_base, fmt, full=True),
        tuned_adherence=_share(tri_tuned, fmt, full=True),
        base_leak=_share(other_base, leak, full=False),
        tuned_leak=_share(other_tuned, leak, full=False))
    record = {k: v for k, v in asdict(demo).items() if k != "run_dir"}
    write_json_atomic(Path(result.run_dir) / "demo.json", record)
    return demo
