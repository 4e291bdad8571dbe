"""Model cards (afinar.model_card): RUN/README.md after training and evaluation, README.md in every
export, `afinar card`; a card failure never fails the run or export it describes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from afinar.evaluation.formatting import fmt_delta, fmt_value, label
from afinar.model_card import render_card

pytestmark = pytest.mark.slow


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "exports", "eval-*"))
    return dest


@pytest.fixture(scope="module")
def run_dir(evaluated_run) -> Path:
    return evaluated_run[0].run_dir


def test_run_card_has_hugging_face_front_matter(run_dir):
    text = (run_dir / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(text)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert meta["base_model"] == config["model"]  # a local folder: no hub id to name
    assert meta["library_name"] == "peft"
    assert meta["license"] == "unknown" and "unknown — check the base model's license" in text
    assert meta["pipeline_tag"] == "text-generation"
    assert {"afinar", "lora", "sft"} <= set(meta["tags"])
    assert text == render_card(run_dir)  # eval refreshed it last: nothing changed since


def test_eval_table_and_leaks_are_report_json(run_dir):
    text = (run_dir / "README.md").read_text(encoding="utf-8")
    report = json.loads((run_dir / "report.json").read_text())
    rows = {cells[0]: cells[1:] for line in _section(text, "Evaluation").splitlines()
            if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])}
    for m in report["metrics"]:
        base, tuned, change = rows[label(m["name"])]
        assert (base, tuned) == (fmt_value(m["name"], m["baseline"]),
                                 fmt_value(m["name"], m["model"]))
        assert change.startswith(fmt_delta(m))
    # exact numbers in the model-index metadata
    results = _front_matter(text)["model-index"][0]["results"][0]
    assert {r["type"]: r["value"] for r in results["metrics"]} == {
        m["name"]: m["model"] for m in report["metrics"] if m["model"] is not None}
    limits = _section(text, "Known limitations and leaks")
    s = report["regressions"]["summary"]
    assert f"shows up in {s['model_leaks']} of {s['prompts']} unrelated prompts" in limits
    assert all(w in limits for w in report["warnings"])


def test_data_section_is_run_json(run_dir):
    text = (run_dir / "README.md").read_text(encoding="utf-8")
    info = json.loads((run_dir / "run.json").read_text())
    data = _section(text, "Training data")
    assert f"| sha256 | `{info['data_sha256']}` |" in data
    assert f"| size | {info['data_size']:,} bytes |" in data
    assert "| examples | 40 (32 trained on, 8 held out" in data
    method = _section(text, "Method and settings")
    assert "| lora.r | 16 |" in method and "| learning_rate | 0.01 |" in method
    assert "```yaml" in method
    results = _section(text, "Training results")
    assert f"| final train loss | {info['summary']['final_train_loss']:.4f} |" in results


def test_training_writes_the_card_and_says_not_evaluated(tiny_model_dir, small_chat_file,
                                                         tmp_path):
    from afinar.config import TrainConfig
    from afinar.pipeline import fine_tune

    result = fine_tune(TrainConfig(data=str(small_chat_file), model=str(tiny_model_dir),
                               output=str(tmp_path / "run"), max_steps=2, batch_size=8,
                               precision="fp32", evaluate=False))
    text = (result.run_dir / "README.md").read_text(encoding="utf-8")
    assert "Not evaluated: run `afinar eval" in _section(text, "Evaluation")
    assert "Unknown: not evaluated" in _section(text, "Known limitations and leaks")
    assert "model-index" not in _front_matter(text)


def test_license_from_the_registry_and_from_the_base_folder(run_dir, tmp_path):
    from afinar.models.registry import DEFAULT_MODEL

    run = _copy_run(run_dir, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": DEFAULT_MODEL}))
    meta = _front_matter(text := render_card(run))
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "`apache-2.0`, the base model's license (from afinar's base-model registry)" in text

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# a base\n")
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "model": str(base)}))
    assert _front_matter(render_card(run))["license"] == "mit"


def test_merged_export_has_a_card_with_its_verification(run_dir, tmp_path):
    from afinar.export import export

    result = export(str(run_dir), to="merged", output=str(tmp_path / "merged"), prompts=2,
                    notify=lambda message: None)
    assert "README.md" in result.files
    text = (result.output / "README.md").read_text(encoding="utf-8")
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers" and {"merged", "f32"} <= set(meta["tags"])
    summary = result.verification.summary()
    verification = _section(text, "Export verification")
    assert verification.startswith("\n**Passed** (transformers, f32)")
    assert f"| prompt token ids identical | {summary['same_prompt_ids']}/2 |" in verification
    assert f"| greedy token agreement | {summary['greedy_agreement']:.1%} |" in verification
    assert json.dumps(str(result.output.resolve())) in _section(text, "How to use")


def test_a_damaged_report_costs_the_card_not_the_export(run_dir, tmp_path):
    from afinar.export import export

    run = _copy_run(run_dir, tmp_path / "run")
    (run / "report.json").write_text("{not json")
    said = []
    result = export(str(run), to="merged", output=str(tmp_path / "merged"), verify=False,
                    notify=said.append)
    assert (result.output / "model.safetensors").is_file()
    assert not (result.output / "README.md").exists()
    assert any("could not write the model card" in m and "report.json" in m for m in said)


def test_cli_card_prints_writes_and_reports_a_damaged_report(run_dir, tmp_path):
    from afinar.cli import app

    runner = CliRunner()
    printed = runner.invoke(app, ["card", str(run_dir)])
    assert printed.exit_code == 0 and printed.stdout == render_card(run_dir)
    out = tmp_path / "card.md"
    written = runner.invoke(app, ["card", str(run_dir), "--output", str(out)])
    assert written.exit_code == 0 and out.read_text(encoding="utf-8") == render_card(run_dir)

    run = _copy_run(run_dir, tmp_path / "run")
    (run / "report.json").write_text("{not json")
    failed = runner.invoke(app, ["card", str(run)])
    said = " ".join(failed.output.split())  # rich wraps long lines
    assert failed.exit_code != 0 and "report.json: cannot be read" in said
