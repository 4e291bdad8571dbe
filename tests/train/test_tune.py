"""`tune`: a few short real trainings on a tiny random Llama, scored on an inner split of the
training part; the trials written (trials.json, the Optuna study), the winner picked by the
declared score, user-set values kept, the run's own held-out examples never seen."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from afinar.config import TrainConfig
from afinar.data.prepare import split_for
from afinar.data.validate import load_examples
from afinar.errors import AfinarError
from afinar.evaluation.report_html import render_html
from afinar.evaluation.report_md import render_markdown
from afinar.tune import pick_best, tune_config
from conftest import write_jsonl

CHECKS = r"""checks:
  - name: format
    regex: 'Categoría: \w+\nPrioridad: \w+'
  - {name: always, regex: '(?s).*'}
"""


def _records(n: int) -> list[dict]:
    kinds = [("envío", "alta"), ("factura", "media"), ("cuenta", "baja")]
    return [{"messages": [
        {"role": "user", "content": f"pedido {i}: problema con {kinds[i % 3][0]}"},
        {"role": "assistant", "content": f"Categoría: {kinds[i % 3][0]}\n"
                                         f"Prioridad: {kinds[i % 3][1]}"}]} for i in range(n)]


def _config(tmp_path, model_dir, n=20, **kw) -> TrainConfig:
    data = write_jsonl(tmp_path / "data.jsonl", _records(n))
    base = dict(data=str(data), model=str(model_dir), output=str(tmp_path / "run"), tune=True,
                tune_trials=3, max_steps=4, batch_size=4, seed=0, precision="fp32",
                max_seq_length=64)
    return TrainConfig(**{**base, **kw})


def _study(run):
    return optuna.load_study(study_name="afinar", storage=f"sqlite:///{run / 'tune' / 'study.db'}")


def test_tune_writes_its_trials_and_picks_the_best_check_pass_rate(tmp_path, tiny_model_dir):
    checks = tmp_path / "checks.yaml"
    checks.write_text(CHECKS, encoding="utf-8")
    config = _config(tmp_path, tiny_model_dir, checks=str(checks))
    run = tmp_path / "run"
    events = []
    tuned, summary = tune_config(config, run, on_event=events.append)

    folder = run / "tune"
    assert json.loads((folder / "trials.json").read_text()) == summary
    assert summary["objective"] == "check_pass_rate"
    assert "check pass rate" in summary["objective_text"]
    trials = summary["trials"]
    assert [t["trial"] for t in trials] == [1, 2, 3]
    assert all(t["score"] == t["check_pass_rate"] and 0.5 <= t["score"] <= 1 for t in trials)
    assert all(t["eval_loss"] > 0 and t["steps"] == 4 for t in trials)
    # The declared score, ties broken by the lower held-out loss.
    assert summary["best"] == max(trials, key=lambda t: (t["score"], -t["eval_loss"]))
    best = summary["best"]
    assert (tuned.learning_rate, tuned.epochs, tuned.tune) == (
        best["learning_rate"], best["epochs"], False)
    assert tuned.model_dump(exclude={"learning_rate", "epochs", "tune"}) == config.model_dump(
        exclude={"learning_rate", "epochs", "tune"})

    # The first trial is the auto values; the others stay in the searched ranges.
    space = summary["search"]
    assert trials[0]["auto"] and trials[0]["learning_rate"] == space["learning_rate"]["auto"]
    assert trials[0]["epochs"] == space["epochs"]["auto"]
    for t in trials:
        assert space["learning_rate"]["low"] * 0.95 <= t["learning_rate"] <= (
            space["learning_rate"]["high"] * 1.05)
        assert space["epochs"]["low"] <= t["epochs"] <= space["epochs"]["high"] <= 25

    study = _study(run)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.value for t in done] == [t["score"] for t in trials]
    assert [t.user_attrs["eval_loss"] for t in done] == [t["eval_loss"] for t in trials]
    assert study.user_attrs == {"objective": "check_pass_rate", "best_trial": best["trial"]}

    for t in trials:  # measured, then emptied of weights
        trial_run = run / t["run_dir"]
        assert (trial_run / "metrics.jsonl").is_file() and (trial_run / "run.json").is_file()
        assert not (trial_run / "adapter").exists() and not (trial_run / "checkpoints").exists()

    # The search never saw the run's own held-out examples.
    _, held, _ = split_for(config, load_examples(config.data))
    searched = load_examples(folder / "data.jsonl").examples
    assert len(searched) == 20 - len(held)
    assert not {ex.messages for ex in searched} & {ex.messages for ex in held}
    assert summary["inner_split"]["train"] + summary["inner_split"]["held_out"] == len(searched)

    messages = [e["message"] for e in events if e["type"] == "log"]
    assert any(m.startswith("tune: trial 3/3: lr") and "check pass rate" in m for m in messages)
    assert any(m.startswith(f"tune: best is trial {best['trial']}") for m in messages)
    assert {e["type"] for e in events} == {"log", "tune_trial"}  # no second "start" for a run


def test_a_learning_rate_the_user_set_is_not_searched(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, learning_rate=5e-3, tune_trials=2)
    run = tmp_path / "run"
    tuned, summary = tune_config(config, run)
    assert summary["objective"] == "eval_loss"  # no checks: held-out loss
    assert summary["search"]["learning_rate"] == {"fixed": 5e-3}
    assert all(t["learning_rate"] == 5e-3 and t["score"] == -t["eval_loss"]
               for t in summary["trials"])
    assert summary["best"] == min(summary["trials"], key=lambda t: t["eval_loss"])
    assert tuned.learning_rate == 5e-3 and tuned.epochs == summary["best"]["epochs"]
    assert all(set(t.params) == {"epochs"} for t in _study(run).trials)

    # A finished search for the same config and data is reused, not run again.
    events = []
    again, reused = tune_config(config, run, on_event=events.append)
    assert reused == summary and again == tuned
    assert "reusing the finished search" in events[0]["message"] and len(events) == 1


def test_epochs_set_are_kept_and_the_learning_rate_searched(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir, epochs=2, max_steps=None, tune_trials=2)
    run = tmp_path / "run"
    _, summary = tune_config(config, run)
    assert summary["search"]["epochs"] == {"fixed": 2}
    trials = summary["trials"]
    assert len({t["learning_rate"] for t in trials}) == 2 and trials[0]["steps"] > 2
    for t in trials:
        assert yaml.safe_load((run / t["run_dir"] / "config.yaml").read_text())["epochs"] == 2
        assert t["steps"] == trials[0]["steps"]
    assert all(set(t.params) == {"learning_rate"} for t in _study(run).trials)


@pytest.mark.parametrize("kw, expected", [
    ({"n": 12}, "leaves 9 training examples after the held-out split; the search needs at least"),
    ({"learning_rate": 1e-3, "epochs": 3}, "nothing to search"),
])
def test_what_cannot_be_searched_is_refused_clearly(tmp_path, tiny_model_dir, kw, expected):
    with pytest.raises(AfinarError) as caught:
        tune_config(_config(tmp_path, tiny_model_dir, **kw), tmp_path / "run")
    assert expected in caught.value.message and caught.value.hint
    assert not (tmp_path / "run" / "tune" / "study.db").exists()


def test_pick_best_breaks_ties_by_held_out_loss_then_order():
    trials = [{"trial": 1, "score": 0.5, "eval_loss": 2.0},
              {"trial": 2, "score": 0.75, "eval_loss": 3.0},
              {"trial": 3, "score": 0.75, "eval_loss": 2.5},
              {"trial": 4, "score": 0.75, "eval_loss": 2.5},
              {"trial": 5, "score": None, "eval_loss": None}]
    assert pick_best(trials)["trial"] == 3
    with pytest.raises(AfinarError):
        pick_best([trials[-1]])


def _report(tuning=None) -> dict:
    return {"model": {"spec": "runs/x"}, "baseline": None, "created_at": "now",
            "data": {"source": "held-out", "examples": 0}, "metrics": [], "examples": [],
            "warnings": [], **({"tuning": tuning} if tuning else {})}


def test_reports_show_the_search_with_the_winner_marked():
    tuning = {
        "objective": "check_pass_rate", "objective_text": "check pass rate (...)",
        "search": {"learning_rate": {"auto": 1e-3, "low": 2.5e-4, "high": 4e-3, "log": True},
                   "epochs": {"fixed": 3}},
        "inner_split": {"train": 13, "held_out": 3},
        "trials": [{"trial": 1, "auto": True, "learning_rate": 1e-3, "epochs": 3, "steps": 9,
                    "eval_loss": 2.5, "check_pass_rate": 0.5, "score": 0.5, "seconds": 4.0},
                   {"trial": 2, "learning_rate": 3.1e-3, "epochs": 3, "steps": 9,
                    "eval_loss": 2.1, "check_pass_rate": 1.0, "score": 1.0, "seconds": 5.0}],
        "seconds": 9.5}
    tuning["best"] = tuning["trials"][1]
    html = render_html(_report(tuning))
    assert "<h2>Hyperparameter search</h2>" in html
    chosen = html.split("<tr class=chosen>")[1].split("</tr>")[0]
    assert ">2<" in chosen and ">0.0031<" in chosen and ">100%<" in chosen and "✓" in chosen
    assert "1 (auto)" in html and "learning rate 0.00025–0.004 (auto 0.001) with epochs 3 as set" in html
    markdown = render_markdown(_report(tuning))
    assert "## Hyperparameter search" in markdown
    assert "| 2 | 0.0031 | 3 | 9 | 2.1000 | 100% | 100% | 5 | ✓ |" in markdown
    assert "Hyperparameter search" not in render_html(_report())
    assert "Hyperparameter search" not in render_markdown(_report())


def test_the_train_command_tune_flag_sets_tune(monkeypatch, tmp_path, small_chat_file):
    from afinar import cli, pipeline

    seen = []

    def fake_train(config, on_event=None, resume=False):
        seen.append(config)
        raise AfinarError("stopped by the test")

    monkeypatch.setattr(pipeline, "fine_tune", fake_train)
    runner = CliRunner()
    for flag, expected in (("--tune", True), ("--no-tune", False), (None, False)):
        args = ["train", "--data", str(small_chat_file)] + ([flag] if flag else [])
        result = runner.invoke(cli.app, args)
        assert "stopped by the test" in result.output
        assert seen[-1].tune is expected


def test_train_with_tune_runs_the_winner_reports_the_search_and_registers_only_the_run(
        monkeypatch, tmp_path, tiny_model_dir):
    from afinar import cli, pipeline
    from afinar.config import load_train_config
    from afinar.versions import open_registry

    checks = tmp_path / "checks.yaml"
    checks.write_text(CHECKS, encoding="utf-8")
    config = _config(tmp_path, tiny_model_dir, tune_trials=2, max_steps=2,
                     checks=str(checks), evaluate=True, preserve=False)
    run = tmp_path / "run"
    result = pipeline.fine_tune(config)
    assert result.run_dir == run

    trials = json.loads((run / "tune" / "trials.json").read_text())
    best = trials["best"]
    assert [t["trial"] for t in trials["trials"]] == [1, 2]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert isinstance(saved["learning_rate"], float) and isinstance(saved["epochs"], int)
    assert (saved["learning_rate"], saved["epochs"], saved["tune"]) == (
        best["learning_rate"], best["epochs"], False)

    report = json.loads((run / "report.json").read_text())
    assert report["tuning"]["best"] == best
    assert report["tuning"] == trials
    html = (run / "report.html").read_text()
    assert "<section id=tuning><h2>Hyperparameter search</h2>" in html
    assert "<tr class=chosen>" in html

    # The run is a model version; its search trials are not.
    with open_registry() as registry:
        paths = [Path(v.path) for v in registry.list()]
    assert run.resolve() in paths
    tune_folder = (run / "tune").resolve()
    assert not [p for p in paths if p == tune_folder or tune_folder in p.parents]

    # `afinar train --resume RUN` reads the saved config: tune is off there, so no new search.
    assert load_train_config(run / "config.yaml", [], anchor_paths=False).tune is False
    seen = []

    def fake_train(cfg, on_event=None, resume=False):
        seen.append((cfg, resume))
        raise AfinarError("stopped by the test")

    monkeypatch.setattr(pipeline, "fine_tune", fake_train)
    out = CliRunner().invoke(cli.app, ["train", "--resume", str(run)])
    assert "stopped by the test" in out.output
    (resumed, resume), = seen
    assert resume and resumed.tune is False
    assert (resumed.learning_rate, resumed.epochs) == (best["learning_rate"], best["epochs"])
