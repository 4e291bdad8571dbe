"""`afinar eval` end to end on a tiny random Llama: report files, metrics, registry, CLI."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from afinar import rundir
from afinar.cli import app
from afinar.versions import open_registry
from conftest import write_jsonl


def _metric(report: dict, name: str) -> dict:
    return next(m for m in report["metrics"] if m["name"] == name)


def test_training_ends_with_a_report_base_vs_tuned(evaluated_run):
    result, _ = evaluated_run
    run = result.run_dir
    for name in ("report.json", "report.html", "report.md"):
        assert (run / name).is_file(), name
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["examples"] == 8 and len(report["examples"]) == 8
    loss = _metric(report, "eval_loss")
    # The report's loss is the training loop's own number for the kept (best) checkpoint.
    assert abs(loss["model"] - result.summary["best_eval_loss"]) < 1e-3
    assert loss["baseline"] > loss["model"] and loss["better"] == "lower"
    # The first evaluation in metrics.jsonl is the base model's: the same number again.
    first = json.loads((run / rundir.METRICS_FILE).read_text().splitlines()[0])
    assert abs(loss["baseline"] - first["eval_loss"]) < 1e-3
    # Declared checks that must say 1 and 0 whatever the model answers.
    assert _metric(report, "check:always")["model"] == 1.0
    assert _metric(report, "check:always")["baseline"] == 1.0
    assert _metric(report, "check:never")["model"] == 0.0
    assert _metric(report, "check:format")["n"] == 8
    for row in report["examples"]:
        fmt = next(c for c in row["model"]["checks"] if c["name"] == "format")
        assert fmt["passed"] == bool(re.fullmatch(
            r"Categoría: \w+\nPrioridad: \w+\nRespuesta: .*", row["model"]["answer"].strip()))
        assert row["change"] in ("improved", "worse", "same", "reworded")
    assert sum(report["changes"].values()) == 8
    reg = report["regressions"]["summary"]
    assert reg["prompts"] == 24 and reg["signature"] == "Prioridad:"
    assert report["training"]["diagnosis"]["best_step"] == result.summary["best_step"]
    assert "| held-out loss |" in (run / "report.md").read_text()


def test_the_run_is_in_the_registry_with_its_evaluation(evaluated_run):
    result, folder = evaluated_run
    with open_registry() as registry:
        version = registry.get(str(result.run_dir))
    assert version.status == "succeeded"
    assert version.metrics["check:always"] == 1.0 and "eval_loss" in version.metrics
    assert version.data_size == (folder / "small.jsonl").stat().st_size
    assert len(version.data_sha256) == 64


def test_cli_eval_on_another_file_without_baseline(evaluated_run, tmp_path):
    result, _ = evaluated_run
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"messages": [{"role": "user", "content": f"pedido {i} llegó tarde"},
                      {"role": "assistant", "content": "Categoría: envío\nPrioridad: media\n"
                                                       f"Respuesta: {i}"}],
         "expected_topics": ["envío"]} for i in range(5)])
    out = tmp_path / "report"
    cli = CliRunner().invoke(app, ["eval", str(result.run_dir), "--data", str(held), "--baseline",
                                   "none", "--output", str(out), "--no-probes", "--json"])
    assert cli.exit_code == 0, cli.output
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"] is None and report["regressions"] is None
    assert report["data"]["examples"] == 5
    assert _metric(report, "check:expected_topics")["n"] == 5
    assert json.loads(cli.stdout)["check:always"] == 1.0


def test_cli_eval_user_errors(tiny_model_dir, tmp_path):
    runner = CliRunner()
    no_data = runner.invoke(app, ["eval", str(tiny_model_dir)])
    assert no_data.exit_code == 1 and "--data" in no_data.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hola"}]}\n{oops\n')
    broken = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(bad)])
    assert broken.exit_code == 1 and "bad.jsonl:2" in broken.output
    assert "Traceback" not in broken.output


def test_greedy_answers_are_reused_only_for_identical_weights(evaluated_run, tmp_path):
    from afinar.evaluation.evaluator import evaluate

    result, _ = evaluated_run
    first = json.loads((result.run_dir / "report.json").read_text())
    again = evaluate(str(result.run_dir), output=str(tmp_path / "again")).data
    assert again["generation"]["answers_from_cache"] == {"model": 8 + 24, "baseline": 8 + 24}
    assert [r["model"]["answer"] for r in again["examples"]] == \
        [r["model"]["answer"] for r in first["examples"]]
    fresh = evaluate(str(result.run_dir), output=str(tmp_path / "fresh"), use_cache=False).data
    assert fresh["generation"]["answers_generated"] == {"model": 32, "baseline": 32}
    assert [r["model"]["answer"] for r in fresh["examples"]] == \
        [r["model"]["answer"] for r in first["examples"]]
    # Other weights (here: the adapter touched) miss the cache.
    adapter = result.run_dir / rundir.ADAPTER_DIR / "adapter_model.safetensors"
    adapter.touch()
    touched = evaluate(str(result.run_dir), output=str(tmp_path / "touched"), probes=False).data
    assert touched["generation"]["answers_from_cache"]["model"] == 0


def test_a_version_id_or_tag_names_its_run_everywhere(evaluated_run, tmp_path):
    from afinar.models.registry import resolve_model

    result, _ = evaluated_run
    with open_registry() as registry:
        version = registry.record_run(result.run_dir)
        registry.tag(version.id, "tiny-eval-test")
    resolved = resolve_model("tiny-eval-test", notify=lambda message: None)
    assert resolved.run_dir.resolve() == result.run_dir.resolve()
    assert resolve_model(version.id, notify=lambda m: None).adapter is not None
    # transformers: the same model on both sides must answer alike token for token, which
    # llama.cpp's batched answers promise only up to near-ties (docs/serving.md).
    cli = CliRunner().invoke(app, ["eval", "tiny-eval-test", "--baseline", version.id,
                                   "--no-probes", "--output", str(tmp_path / "r"),
                                   "--engine", "transformers"])
    assert cli.exit_code == 0, cli.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["data"]["examples"] == 8 and report["baseline"]["spec"] == version.id
    # The same model on both sides: identical answers, no change anywhere.
    assert report["changes"]["same"] == 8


def test_changed_training_data_is_flagged(evaluated_run, tmp_path):
    import shutil

    from afinar.evaluation.evaluator import evaluate

    result, folder = evaluated_run
    copy = tmp_path / "run"
    shutil.copytree(result.run_dir, copy)
    data = tmp_path / "small.jsonl"
    data.write_text((folder / "small.jsonl").read_text() + (folder / "small.jsonl").read_text()
                    .splitlines()[0].replace("pedido 0", "pedido 99") + "\n")
    config = (copy / rundir.CONFIG_FILE).read_text().replace(str(folder / "small.jsonl"),
                                                             str(data))
    (copy / rundir.CONFIG_FILE).write_text(config)
    report = evaluate(str(copy), baseline="none", probes=False).data
    assert any("changed since this run trained" in w for w in report["warnings"])
