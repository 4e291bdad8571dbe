"""`report_to: [tensorboard, mlflow, wandb]`: one real training run (tiny Llama, a few steps, with
its end-of-run evaluation) reported to all three tools through their own libraries, offline, then
read back with each tool's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from afinar import rundir
from afinar.config import TrainConfig, build_config
from afinar.errors import AfinarError
from afinar.train import tracking
from afinar.pipeline import fine_tune
from conftest import write_jsonl

STEPS = 6


def _data(folder: Path) -> Path:
    return write_jsonl(folder / "small.jsonl", [{"messages": [
        {"role": "user", "content": f"pedido {i} llegó roto"},
        {"role": "assistant", "content": f"Categoría: envío\nPrioridad: alta\nRespuesta: {i}"}]}
        for i in range(40)])


def _config(data, model_dir, out, **kw) -> TrainConfig:
    base = dict(data=str(data), model=str(model_dir), output=str(out), learning_rate=1e-2,
                batch_size=4, max_steps=STEPS, eval_steps=3, seed=0, precision="fp32")
    return TrainConfig(**{**base, **kw})


def _offline(mp: pytest.MonkeyPatch, home: Path) -> None:
    """Nothing may leave the machine: W&B offline with its folders under the test's own."""
    for name in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT"):
        mp.delenv(name, raising=False)
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR",
                 "WANDB_ARTIFACT_DIR"):
        mp.setenv(name, str(home / name.lower()))


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    """(run dir, metrics.jsonl records, events): the one shared training run."""
    folder = tmp_path_factory.mktemp("tracked")
    events: list[dict] = []
    with pytest.MonkeyPatch.context() as mp:
        _offline(mp, folder)
        result = fine_tune(_config(_data(folder), tiny_model_dir, folder / "run",
                               report_to=["tensorboard", "mlflow", "wandb"]),
                       on_event=events.append)
    run = result.run_dir
    records = [json.loads(line) for line in (run / rundir.METRICS_FILE).read_text().splitlines()]
    assert result.report is not None and (run / "report.json").is_file()  # evaluation ran
    return run, records, events


def _series(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None]


def test_tensorboard_event_files_hold_the_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, records, _ = tracked
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    for key in ("train_loss", "learning_rate", "grad_norm", "tokens_per_s", "eval_loss"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        want = _series(records, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key
    assert len(acc.Scalars("train_loss")) == STEPS
    assert [e.step for e in acc.Scalars("eval_loss")] == [0, 3, 6]  # the base model's at 0
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report_to:" in config and "max_steps: 6" in config
    assert "report.md/text_summary" in acc.Tags()["tensors"]


def test_mlflow_run_holds_metrics_params_and_report(tracked):
    from mlflow.tracking import MlflowClient

    run, records, _ = tracked
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("afinar")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    for key in ("train_loss", "train_token_accuracy", "learning_rate", "eval_loss",
                "eval_perplexity"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(found.info.run_id,
                                                                                key))
        assert history == _series(records, key), key  # float64 both sides: exactly equal
    params = found.data.params
    assert params["max_steps"] == "6" and params["lora.r"] == "16"
    assert params["report_to"] == "['tensorboard', 'mlflow', 'wandb']"
    assert params["data"] == str(run.parent / "small.jsonl")
    assert all(len(v) <= tracking.MLFLOW_PARAM_LIMIT for v in params.values())
    report = {Path(a.path).name for a in client.list_artifacts(found.info.run_id, "report")}
    assert report == {"report.json", "report.md", "report.html"}
    saved = client.download_artifacts(found.info.run_id, "config.json",
                                      str(run.parent / "mlflow-download"))
    assert json.loads(Path(saved).read_text())["lora"]["r"] == 16


def _wandb_records(run: Path) -> list[dict]:
    """The offline run's transaction log (.wandb), read by W&B's own reader: `wandb leet inspect
    --json` (wandb 0.31 has no Python reader left; this runs its wandb-core binary)."""
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run([cli, "leet", "inspect", str(log), "--json"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_wandb_offline_run_holds_history_config_and_report(tracked):
    run, records, _ = tracked
    log = _wandb_records(run)
    # One history row per step: W&B merges the train and eval records logged at one step.
    rows = {r["history"]["step"]["num"]: r["history"]["item"]
            for r in log if r.get("type") == "history"}
    assert sorted(rows) == list(range(STEPS + 1))  # step 0: the base model's held-out loss
    for key in ("train_loss", "learning_rate", "grad_norm", "eval_loss", "eval_perplexity"):
        got = [(step, row[key]) for step, row in sorted(rows.items()) if key in row]
        assert got == _series(records, key), key  # float64 through protobuf and JSON: exact
    (config,) = [r["run"]["config"]["update"] for r in log if r.get("type") == "run"]
    assert config["lora"]["r"] == 16 and config["report_to"] == ["tensorboard", "mlflow", "wandb"]
    (artifact,) = [r["artifact"] for r in log if r.get("type") == "artifact"]
    assert artifact["type"] == "evaluation"
    assert {f["path"] for f in artifact["manifest"]["contents"]} == {
        "report.json", "report.md", "report.html"}
    (exit_record,) = [r["exit"] for r in log if r.get("type") == "exit"]
    assert exit_record.get("exit_code", 0) == 0
    assert (run / "wandb").glob("offline-run-*")  # offline: nothing was sent


def test_the_run_says_where_it_reports(tracked):
    run, _, events = tracked
    (line,) = [e["message"] for e in events if e.get("type") == "log"
               and e["message"].startswith("reporting to ")]
    assert f"sqlite:///{run / 'mlflow.db'}" in line and "wandb (offline" in line


def test_a_missing_library_stops_the_run_before_training(tmp_path, tiny_model_dir):
    # The one mock of a library here, and why: wandb IS installed in this environment, so its
    # absence is simulated (sys.modules[name] = None makes `import name` raise ImportError).
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "wandb", None)
        with pytest.raises(AfinarError) as caught:
            fine_tune(_config(_data(tmp_path), tiny_model_dir, tmp_path / "run",
                          report_to=["tensorboard", "wandb"]))
    assert "pip install 'afinar[tracking]'" in str(caught.value)
    assert "wandb" in caught.value.message
    assert not (tmp_path / "run").exists()  # before anything was written, let alone trained


def test_report_to_accepts_one_name_and_names_the_tools():
    values = dict(data="d.jsonl")
    assert build_config(TrainConfig, {**values, "report_to": "mlflow"}, "t").report_to == [
        "mlflow"]
    assert TrainConfig(**values).report_to == []
    with pytest.raises(AfinarError, match="report_to"):
        build_config(TrainConfig, {**values, "report_to": ["comet"]}, "t")


class _FullDisk:
    """A reporter whose disk fills up at the second step (a stand-in for a real tool's failure;
    the fan-out's handling is what is tested)."""
    name = "tensorboard"
    calls: list = []

    def start(self, run_dir, config, run_name, first_step=0):
        self.calls.append("start")

    def log(self, metrics, step):
        self.calls.append(step)
        if step >= 2:
            raise OSError(28, "No space left on device")

    def artifact(self, path):
        self.calls.append("artifact")

    def finish(self, status):
        self.calls.append(("finish", status))


def test_a_failing_tracker_warns_once_and_training_goes_on(tmp_path, tiny_model_dir,
                                                           monkeypatch):
    monkeypatch.setitem(tracking.REPORTERS, "tensorboard", _FullDisk)
    events: list[dict] = []
    result = fine_tune(_config(_data(tmp_path), tiny_model_dir, tmp_path / "run", max_steps=4,
                           held_out_fraction=0, evaluate=False, report_to=["tensorboard"]),
                   on_event=events.append)
    assert result.summary["steps"] == 4
    warnings = [e["message"] for e in events
                if e.get("type") == "log" and "no longer reporting" in e.get("message", "")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    assert _FullDisk.calls == ["start", 1, 2, ("finish", "failed")]
