"""The model-version registry (afinar.versions) and `afinar models`, on a real SQLite file."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from afinar.errors import AfinarError
from afinar.cli.models import models_app
from afinar.versions import compare_rows, metric_direction, open_registry

app = typer.Typer()
app.add_typer(models_app, name="models")
runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("AFINAR_HOME", str(home))
    return home


def make_run(path: Path, status="succeeded", summary=None, report=None, **info) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    info = {"status": status, "base_model": "tiny-llama", "method": "lora",
            "data": "/data/soporte.jsonl", "data_sha256": "ab" * 32, "data_size": 1234,
            "created_at": "2026-05-01T10:00:00+00:00", "summary": summary or {}, **info}
    (path / "run.json").write_text(json.dumps(info))
    (path / "config.yaml").write_text("model: tiny-llama\nmax_steps: 3\n")
    if report is not None:
        (path / "report.json").write_text(json.dumps({"summary": report, "examples": []}))
    return path


def models(*args: str):
    return runner.invoke(app, ["models", *args], env={"COLUMNS": "250"})


def test_record_and_get_by_id_number_tag_and_path(tmp_path, home):
    run = make_run(tmp_path / "run-a", summary={"final_train_loss": 1.5, "precision": "fp32"},
                   report={"eval_loss": 1.2, "format_adherence": 0.9})
    with open_registry() as reg:
        v = reg.record_run(run)
        assert (home / "registry.db").is_file()
        assert v.id == "v1" and v.path == str(run.resolve()) and v.status == "succeeded"
        assert (v.base_model, v.method, v.data_path, v.data_size) == (
            "tiny-llama", "lora", "/data/soporte.jsonl", 1234)
        assert v.config.startswith("model: tiny-llama")
        # words such as the precision are not metrics; the evaluation's come first
        assert list(v.metrics) == ["eval_loss", "format_adherence", "final_train_loss"]
        reg.tag("v1", "prod")
        for ref in ("v1", "1", "V1", "prod", str(run), str(tmp_path / "." / "run-a")):
            assert reg.get(ref).id == "v1", ref
        assert reg.get("prod").tags == ["prod"]


def test_missing_fields_and_files_are_null(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "run.json").write_text("{}")
    with open_registry() as reg:
        v = reg.record_run(run)
    assert v.status is None and v.config is None and v.metrics == {} and v.data_size is None


def test_record_is_an_idempotent_upsert(tmp_path):
    run = make_run(tmp_path / "run", status="running")
    with open_registry() as reg:
        first = reg.record_run(run)
        make_run(run, summary={"best_eval_loss": 0.7}, report={"eval_loss": 0.8},
                 finished_at="2026-05-01T11:00:00+00:00")
        again = reg.record_run(run)
        assert again.id == first.id == "v1" and len(reg.list()) == 1
        assert again.status == "succeeded" and again.finished_at.startswith("2026-05-01T11")
        assert again.metrics == {"eval_loss": 0.8, "best_eval_loss": 0.7}


def test_ids_are_never_reused_after_remove(tmp_path):
    with open_registry() as reg:
        ids = [reg.record_run(make_run(tmp_path / f"r{i}")).id for i in range(3)]
        reg.tag("v3", "latest")
        assert reg.remove("latest").id == "v3"
        assert reg.record_run(make_run(tmp_path / "r9")).id == "v4"
        assert ids == ["v1", "v2", "v3"] and [v.id for v in reg.list()] == ["v4", "v2", "v1"]
        with pytest.raises(AfinarError, match="no model version v3"):
            reg.get("v3")
        with pytest.raises(AfinarError):
            reg.get("latest")  # the tag went with the version


def test_tags_move_and_bad_names_are_refused(tmp_path):
    with open_registry() as reg:
        reg.record_run(make_run(tmp_path / "a"))
        reg.record_run(make_run(tmp_path / "b"))
        reg.tag("v1", "prod")
        reg.tag("v2", "prod")
        assert reg.get("prod").id == "v2" and reg.get("v1").tags == []
        for bad in ("v7", "V7", "12", "with space", "-x", "a/b", "", "."):
            with pytest.raises(AfinarError):
                reg.tag("v1", bad)
        assert reg.untag("prod").id == "v2" and reg.get("v2").tags == []
        with pytest.raises(AfinarError, match="no tag"):
            reg.untag("prod")


def test_unknown_refs_and_non_run_dirs_are_clear_errors(tmp_path):
    with open_registry() as reg:
        with pytest.raises(AfinarError) as err:
            reg.get("v42")
        assert "v42" in err.value.message and "afinar models list" in err.value.hint
        with pytest.raises(AfinarError, match="nope"):
            reg.get("nope")
        with pytest.raises(AfinarError, match="not a run directory"):
            reg.record_run(tmp_path)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    with open_registry() as reg, pytest.raises(AfinarError, match="run.json"):
        reg.record_run(tmp_path / "broken")


def test_compare_rows_put_evaluation_first(tmp_path):
    with open_registry() as reg:
        a = reg.record_run(make_run(tmp_path / "a", summary={"best_eval_loss": 0.9}))
        b = reg.record_run(make_run(tmp_path / "b", summary={"best_eval_loss": 0.8},
                                    report={"eval_loss": 0.85, "json_checks_pass_rate": 1.0}))
    assert compare_rows([a, b]) == [("eval_loss", [None, 0.85]),
                                    ("json_checks_pass_rate", [None, 1.0]),
                                    ("best_eval_loss", [0.9, 0.8])]
    assert [metric_direction(n) for n in ("eval_perplexity", "probes_leaks", "check:json_valid",
                                          "check:no_format_leak", "rougeL", "steps")] == [
        "lower", "lower", "higher", "higher", "higher", None]


def test_cli_list_show_compare_tag(tmp_path):
    with open_registry() as reg:
        for name, loss, adherence in (("a", 1.25, 0.5), ("b", 0.75, 0.75)):
            reg.record_run(make_run(tmp_path / name, report={
                "eval_loss": loss, "check:format_adherence": adherence}))
    result = models("list")
    assert result.exit_code == 0, result.output
    assert "eval_loss" in result.output and "check:format_adherence" in result.output
    assert result.output.index("v2") < result.output.index("v1")
    assert "soporte.jsonl" in result.output

    assert models("tag", "v1", "baseline").exit_code == 0
    result = models("show", "baseline", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["id"] == "v1" and shown["tags"] == ["baseline"] and shown["metrics"]["eval_loss"]
    assert "max_steps: 3" in models("show", "1").output

    result = models("compare", "baseline", "v2", "--json")
    rows = {r["metric"]: r for r in json.loads(result.output)["rows"]}
    assert rows["eval_loss"]["values"] == [1.25, 0.75] and rows["eval_loss"]["better"] == "lower"
    result = models("compare", "v1", "v2")
    assert result.exit_code == 0 and "0.7500" in result.output

    result = models("show", "v9")
    assert result.exit_code == 1 and "no model version v9" in result.output
    assert "Traceback" not in result.output
    result = models("tag", "v1", "v2")
    assert result.exit_code == 1 and "looks like a version id" in result.output
    assert models("untag", "baseline").exit_code == 0


def test_cli_rm_asks_and_only_deletes_run_dirs(tmp_path):
    with open_registry() as reg:
        for name in ("a", "b", "c", "d"):
            reg.record_run(make_run(tmp_path / name))

    result = runner.invoke(app, ["models", "rm", "v1"], input="n\n")
    assert str((tmp_path / "a").resolve()) in result.output and result.exit_code == 1
    assert (tmp_path / "a" / "run.json").is_file() and open_registry().get("v1")

    result = models("rm", "v1", "--yes")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "a").exists()

    result = runner.invoke(app, ["models", "rm", "v2"], input="y\n")
    assert result.exit_code == 0 and not (tmp_path / "b").exists()

    assert models("rm", "v3", "--keep-files").exit_code == 0
    assert (tmp_path / "c" / "run.json").is_file()

    # a registered folder that no longer looks like a run (run.json gone) is never rmtree'd
    (tmp_path / "d" / "run.json").unlink()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    result = models("rm", "v4", "--yes")
    assert result.exit_code == 1 and "refusing" in result.output
    assert (tmp_path / "d" / "precious.txt").is_file()
    with open_registry() as reg:
        assert [v.id for v in reg.list()] == ["v4"]


_WORKER = """
import json, sys, time
from pathlib import Path
from afinar.versions import open_registry
db, go, runs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
while not go.exists():
    time.sleep(0.005)
ids = {}
for run in runs:  # a fresh connection each time, as separate `afinar` commands would open
    with open_registry(db) as reg:
        ids[run] = reg.record_run(run).id
for round in (1, 2):
    for run in runs:
        info = json.loads((Path(run) / "run.json").read_text())
        info["summary"] = {"best_eval_loss": 1.0 / round}
        (Path(run) / "run.json").write_text(json.dumps(info))
        with open_registry(db) as reg:
            assert reg.record_run(run).id == ids[run]
print(json.dumps(ids))
"""


def test_concurrent_writers_do_not_corrupt_the_registry(tmp_path):
    db, go = tmp_path / "shared" / "registry.db", tmp_path / "go"
    workers, per_worker = 6, 25
    batches = [[str(make_run(tmp_path / f"w{w}" / f"run{i}", status="running"))
                for i in range(per_worker)] for w in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(db), str(go), *runs],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for runs in batches]
    time.sleep(0.5)  # let every interpreter start, so they all hit the database together
    go.touch()
    assigned = {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        assigned.update(json.loads(stdout))

    total = workers * per_worker
    assert len(assigned) == total and len(set(assigned.values())) == total
    with open_registry(db) as reg:
        versions = reg.list()
    assert sorted(int(v.id[1:]) for v in versions) == list(range(1, total + 1))
    assert {v.path for v in versions} == {str(Path(r).resolve()) for r in assigned}
    assert all(v.metrics == {"best_eval_loss": 0.5} for v in versions)
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
