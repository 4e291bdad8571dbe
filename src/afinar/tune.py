"""`tune: true`: learning rate and epochs chosen by a few short runs, then the full run uses them.

    config, summary = tune_config(config, Path("runs/soporte"))   # fine_tune() does this first

What OpenAI's `auto` hyperparameters do, but measured. An Optuna study (TPE, seeded; its first
trial is the `auto` values) trains `tune_trials` times and scores each trial on an inner held-out
split of the run's *training* part: the run's own held-out split, on which the final model is
judged, is never seen by the search. The score is the check pass rate on those examples when
checks apply to them (a checks file, or checks on the example lines), ties broken by the lower
held-out loss; else minus the held-out loss. A value the user set (a number, not `auto`) is kept
in every trial and not searched.

    RUN/tune/data.jsonl    the training part of `data`; every trial splits it again (seeded, 20%)
    RUN/tune/study.db      the study: optuna.load_study(study_name="afinar",
                           storage="sqlite:///RUN/tune/study.db")
    RUN/tune/trial-N/      each trial's config.yaml, run.json, metrics.jsonl (weights removed)
    RUN/tune/trials.json   every trial's settings and scores, the winner; report.html shows it

Progress goes to `on_event` as Log events (one line per trial) and, for a trial's own training
events, TuneTrial(trial, trials, event) (afinar.events), which consumers of a run's events (the
CLI's progress bar, the server's job events) leave alone.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from afinar import rundir
from afinar.config import TrainConfig, auto_epochs
from afinar.data.example import Example
from afinar.data.jsonl import read_jsonl
from afinar.data.prepare import check_usable, split_for
from afinar.data.validate import load_examples
from afinar.errors import AfinarError
from afinar.events import Listener, Log, TuneTrial
from afinar.paths import sha256_file

TUNE_DIR = "tune"
TRIALS_FILE = "trials.json"
STUDY_FILE = "study.db"
STUDY_NAME = "afinar"
DATA_FILE = "data.jsonl"
INNER_FRACTION = 0.2
# The inner split needs examples on both sides; a `data` file below 10 is refused anyway.
MIN_TRAIN_EXAMPLES = 10
MAX_EPOCHS = 25
LR_SPAN = 4.0  # the learning rate is searched in auto / 4 .. auto * 4 (log-uniform)
LR_CAP = {"lora": 1e-2, "full": 1e-3}  # above these, runs diverge rather than learn faster
OBJECTIVES = {
    "check_pass_rate": "check pass rate on the inner held-out examples (each example's mean over "
                       "the checks that apply to it), ties broken by the lower held-out loss",
    "eval_loss": "held-out loss on the inner held-out examples (score = minus the loss)",
}
_SHORT = {"check_pass_rate": "check pass rate (then held-out loss)", "eval_loss": "held-out loss"}
_WEIGHTS = (rundir.ADAPTER_DIR, rundir.FULL_MODEL_DIR, rundir.CHECKPOINTS_DIR,
            rundir.TOKENIZER_DIR)


def tune_config(config: TrainConfig, run: Path, on_event: Listener | None = None
                ) -> tuple[TrainConfig, dict]:
    """The config with the winning `learning_rate` and `epochs` (numbers; `tune` off), and the
    search's summary, also written to RUN/tune/trials.json. A finished search for the same
    config and data in RUN/tune is reused; an unfinished one is started over."""
    emit = on_event or (lambda event: None)

    def say(message: str, level: str = "info") -> None:
        emit(Log(level, message))

    if os.environ.get("WORLD_SIZE", "1") != "1":
        # Every process would run its own study on the same files.
        raise AfinarError("tune runs in one process, not under torchrun or accelerate launch",
                          "search first with `afinar train --tune` in one process, then launch "
                          "with the learning_rate and epochs of RUN/tune/trials.json's best")
    folder = Path(run) / TUNE_DIR
    training_part = _training_part(config)
    key = _search_key(config)
    done = _finished_search(folder, key)
    if done is not None:
        say(f"tune: reusing the finished search in {folder / TRIALS_FILE}: "
            f"{_describe(done['best'], done['objective'])}")
        return _winner_config(config, done["best"]), done
    space = _search_space(config, training_part)
    if folder.exists():
        say(f"tune: an unfinished search in {folder} is started over")
        shutil.rmtree(folder)
    started = time.perf_counter()

    folder.mkdir(parents=True)
    data_file = folder / DATA_FILE
    _write_examples(config.data, training_part, data_file)
    template = _trial_config(config, data_file, folder / "trial-0", config.learning_rate,
                             config.epochs)
    inner_train, inner_held, how = split_for(template, load_examples(data_file, config.format))
    from afinar.evaluation.checks import load_checks

    checks = load_checks(config.checks)
    checked = [ex for ex in inner_held if ex.is_chat and checks.for_example(ex)]
    objective = "check_pass_rate" if checked else "eval_loss"
    say(f"tune: {config.tune_trials} short runs on {len(inner_train)} of the "
        f"{len(training_part)} training examples, searching {_describe_space(space)}; each "
        f"scored by {_SHORT[objective]} on the other {len(inner_held)} (the run's own held-out "
        "examples stay unseen)")
    if config.checks and not checked:
        say(f"tune: no check of {config.checks} applies to the inner held-out examples, so "
            "trials are scored by held-out loss", "warning")
    if len(inner_held) < 5:
        say(f"tune: trials are scored on {len(inner_held)} held-out examples only: with so few, "
            "the search's choice is noisy", "warning")
    if config.max_steps and "low" in space["epochs"]:
        say(f"tune: max_steps={config.max_steps} caps every trial, so epochs may change nothing",
            "warning")

    def run_trial(number: int, params: dict) -> dict:
        trial_config = _trial_config(config, data_file, folder / f"trial-{number}",
                                     params["learning_rate"], params["epochs"])
        return _run_trial(trial_config, number, objective, checked, checks,
                          _trial_events(emit, number, config.tune_trials))

    records, sampler = _run_study(folder, config, space, objective, run_trial, say)
    best = pick_best(records)
    summary = {
        "afinar_tune": 1, "key": key, "objective": objective,
        "objective_text": OBJECTIVES[objective], "search": space,
        "inner_split": {"data": f"{TUNE_DIR}/{DATA_FILE}", "method": how,
                        "train": len(inner_train), "held_out": len(inner_held),
                        "scored_by_checks": len(checked)},
        "study": {"storage": f"{TUNE_DIR}/{STUDY_FILE}", "name": STUDY_NAME, "sampler": sampler},
        "trials": records, "best": best,
        "seconds": round(time.perf_counter() - started, 2),
    }
    rundir.write_json_atomic(folder / TRIALS_FILE, summary)
    say(f"tune: best is trial {best['trial']} of {len(records)}: lr {best['learning_rate']:.2g}, "
        f"{best['epochs']} epochs ({_describe(best, objective)}); the search took "
        f"{summary['seconds']:.0f} s")
    return _winner_config(config, best), summary


def _run_study(folder: Path, config: TrainConfig, space: dict, objective: str,
               run_trial: Callable[[int, dict], dict], say) -> tuple[list[dict], str]:
    """The Optuna study: its first trial is the auto values, then TPE (seeded). Returns every
    trial's record and the sampler in words."""
    import optuna

    n_startup = min(10, max(3, config.tune_trials // 2))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happened
    study = optuna.create_study(
        storage=f"sqlite:///{(folder / STUDY_FILE).resolve()}", study_name=STUDY_NAME,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=n_startup))
    study.set_user_attr("objective", objective)
    study.enqueue_trial({name: s["auto"] for name, s in space.items() if "low" in s})
    records: list[dict] = []

    def objective_fn(trial) -> float:
        number, params = trial.number + 1, _suggest(trial, space)
        again = next((r for r in records if (r["learning_rate"], r["epochs"]) == (
            params["learning_rate"], params["epochs"])), None)
        say(f"tune: trial {number}/{config.tune_trials}: lr {params['learning_rate']:.2g}, "
            f"{params['epochs']} epochs" + (f" (as trial {again['trial']}: not run again)"
                                            if again else ""))
        if again is not None:  # TPE may propose a pair again (epochs are whole numbers)
            record = {**again, "trial": number, "same_as": again["trial"], "seconds": 0.0}
        else:
            record = run_trial(number, params)
        record["auto"] = trial.number == 0
        for name, value in record.items():
            trial.set_user_attr(name, value)
        records.append(record)
        say(f"tune: trial {number}/{config.tune_trials}: lr {record['learning_rate']:.2g}, "
            f"{record['epochs']} epochs → {_describe(record, objective)} ({record['steps']} "
            f"steps, {record['seconds']:.0f} s)")
        return record["score"]

    try:
        study.optimize(objective_fn, n_trials=config.tune_trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.set_user_attr("best_trial", pick_best(records)["trial"])
    return records, (f"TPE (seed {config.seed}, {n_startup} startup trials); the first trial is "
                     "the auto values")


def pick_best(trials: list[dict]) -> dict:
    """The highest score; among equal scores the lower held-out loss, then the earlier trial."""
    scored = [t for t in trials if t.get("score") is not None]
    if not scored:
        raise AfinarError("tune: no trial produced a score (no held-out loss was measured)",
                          "check that examples are left after max_seq_length")
    return max(scored, key=lambda t: (t["score"], -_loss_or_inf(t), -t["trial"]))


def _loss_or_inf(trial: dict) -> float:
    return math.inf if trial.get("eval_loss") is None else trial["eval_loss"]


# --- what is searched -------------------------------------------------------------------------

def _auto_epochs(config: TrainConfig, examples: list[Example]) -> int:
    """What `epochs: auto` gives the full run on these training examples (the one place that
    follows config.auto_epochs' signature)."""
    return auto_epochs(len(examples))


def _parameter_count(config: TrainConfig) -> int:
    """As the training loop counts them for `learning_rate: auto`."""
    from afinar.models.shape import config_parameter_count, read_model_config

    return config_parameter_count(read_model_config(config.model))


def _search_space(config: TrainConfig, training_part: list[Example]) -> dict:
    """{name: {"auto", "low", "high"}} for a searched value, {name: {"fixed"}} for one the user
    set. The learning rate's auto is the model-size rule the full run would use."""
    space: dict[str, dict] = {}
    if config.learning_rate == "auto":
        auto = config.resolved_learning_rate(_parameter_count(config))
        high = min(auto * LR_SPAN, max(auto, LR_CAP[config.method]))
        space["learning_rate"] = {"auto": auto, "low": auto / LR_SPAN, "high": high, "log": True}
    else:
        space["learning_rate"] = {"fixed": float(config.learning_rate)}
    if config.epochs == "auto":
        auto = _auto_epochs(config, training_part)
        space["epochs"] = {"auto": auto, "low": max(1, auto // 2),
                           "high": max(2, auto, min(MAX_EPOCHS, auto * 2))}
    else:
        space["epochs"] = {"fixed": int(config.epochs)}
    if not any("low" in s for s in space.values()):
        raise AfinarError("tune: learning_rate and epochs are both set, so there is nothing to "
                          "search", "set one of them to auto, or turn tune off")
    return space


def _suggest(trial, space: dict) -> dict:
    lr, epochs = space["learning_rate"], space["epochs"]
    if "low" in lr:
        # Two significant digits, as `auto` gives: a config a person can read.
        value = trial.suggest_float("learning_rate", lr["low"], lr["high"], log=True)
        learning_rate = float(f"{value:.2g}")
    else:
        learning_rate = lr["fixed"]
    return {"learning_rate": learning_rate,
            "epochs": trial.suggest_int("epochs", epochs["low"], epochs["high"])
            if "low" in epochs else epochs["fixed"]}


def _describe_space(space: dict) -> str:
    parts = []
    for name, s in space.items():
        shown = (lambda v: f"{v:.2g}") if name == "learning_rate" else str
        parts.append(f"{name} {shown(s['low'])}..{shown(s['high'])} (auto {shown(s['auto'])})"
                     if "low" in s else f"{name} fixed at {shown(s['fixed'])}")
    return ", ".join(parts)


def _describe(record: dict, objective: str) -> str:
    loss = record.get("eval_loss")
    text = "held-out loss " + ("n/a" if loss is None else f"{loss:.4f}")
    if objective == "check_pass_rate":
        text = f"check pass rate {record['check_pass_rate']:.0%}, " + text
    return text


# --- the data the search sees -----------------------------------------------------------------

def _training_part(config: TrainConfig) -> list[Example]:
    """The examples the full run trains on: never its held-out ones."""
    report = load_examples(config.data, config.format)
    check_usable(report)
    train_examples, _, _ = split_for(config, report)
    if len(train_examples) < MIN_TRAIN_EXAMPLES:
        raise AfinarError(
            f"tune: {config.data} leaves {len(train_examples)} training examples after the "
            f"held-out split; the search needs at least {MIN_TRAIN_EXAMPLES} to hold some of "
            "them out again (the run's own held-out examples stay unseen)",
            "add examples, or train without tune (set learning_rate and epochs, or leave them "
            "auto)")
    return train_examples


def _write_examples(source: str, examples: list[Example], dest: Path) -> None:
    """The examples' own lines of `source`, as parsed (any format), in file order."""
    records = dict(read_jsonl(source, []))
    lines = [json.dumps(records[ex.line], ensure_ascii=False) + "\n"
             for ex in sorted(examples, key=lambda ex: ex.line)]
    rundir.write_text_atomic(dest, "".join(lines))


def _trial_config(config: TrainConfig, data_file: Path, output: Path, learning_rate,
                  epochs) -> TrainConfig:
    values = config.model_dump()
    values.update(data=str(data_file), validation_data=None, held_out_fraction=INNER_FRACTION,
                  output=str(output), learning_rate=learning_rate, epochs=epochs, tune=False,
                  evaluate=False)
    return TrainConfig.model_validate(values)


def _winner_config(config: TrainConfig, best: dict) -> TrainConfig:
    return config.model_copy(update={"learning_rate": float(best["learning_rate"]),
                                     "epochs": int(best["epochs"]), "tune": False})


def _search_key(config: TrainConfig) -> str:
    """Same config (but where the run goes), same data files: the same search."""
    values = config.model_dump(mode="json", exclude={"output", "evaluate"})
    files = {k: sha256_file(Path(v)) for k in ("data", "validation_data", "checks")
             if (v := getattr(config, k)) and Path(v).is_file()}
    text = json.dumps({"config": values, "files": files}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finished_search(folder: Path, key: str) -> dict | None:
    try:
        done = json.loads((folder / TRIALS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and done.get("key") == key and done.get("best") else None


# --- one trial --------------------------------------------------------------------------------

def _trial_events(emit: Listener, number: int, trials: int) -> Listener:
    """A trial's training events, wrapped so that nothing takes them for the run's own: not a
    progress bar, not the server's job (whose checkpoints they are not). Its log lines too: they
    name the inner data file, and a failed trial's "resume it with" would mislead."""
    return lambda event: emit(TuneTrial(number, trials, event))


def _run_trial(config: TrainConfig, number: int, objective: str, checked: list[Example],
               checks, on_event: Listener) -> dict:
    from afinar.engines import replay_answerer
    from afinar.train.recipe import train

    started = time.perf_counter()
    result = train(config, on_event=on_event, base_answerer=replay_answerer(config))
    summary = result.summary
    _free_memory()  # the trial's model and optimizer, before the next one loads
    rate = (_check_pass_rate(result.run_dir, checked, checks, config.device, config.engine)
            if objective == "check_pass_rate" else None)
    for name in _WEIGHTS:  # the trial is measured; its weights would only fill the disk
        shutil.rmtree(result.run_dir / name, ignore_errors=True)
    loss = summary.get("best_eval_loss")
    if loss is None:
        raise AfinarError(f"tune: trial {number} has no held-out loss: none of its held-out "
                          f"examples is left at max_seq_length={config.max_seq_length}",
                          "raise max_seq_length, or use overflow: truncate")
    score = rate if objective == "check_pass_rate" else -loss
    return {"trial": number, "learning_rate": config.learning_rate, "epochs": config.epochs,
            "eval_loss": loss, "check_pass_rate": rate, "score": score,
            "steps": summary.get("steps"), "best_step": summary.get("best_step"),
            "stopped_early": summary.get("stopped_early"),
            "train_seconds": summary.get("train_seconds"),
            "seconds": round(time.perf_counter() - started, 2),
            "run_dir": f"{TUNE_DIR}/{result.run_dir.name}"}


def _check_pass_rate(run: Path, examples: list[Example], checks, device: str,
                     engine: str = "auto") -> float:
    """Greedy answers of the trial's best weights, as the end-of-run evaluation makes them (on
    the engine it uses: llama.cpp answers the prompts in parallel)."""
    from afinar.engines import open_model
    from afinar.evaluation.checks import run_check
    from afinar.evaluation.evaluator import answer_budget
    from afinar.infer.generate import GenerationSettings

    model = open_model(str(run), engine, device=device, notify=lambda message: None)
    try:
        settings = GenerationSettings(max_new_tokens=answer_budget(model.tokenizer, examples))
        answers = model.generate([list(ex.prompt_messages()) for ex in examples], settings, 16)
    finally:
        model.close()
    del model
    _free_memory()
    per_example = []
    for ex, answer in zip(examples, answers):
        scores = [run_check(spec, answer).score for spec in checks.for_example(ex)]
        per_example.append(sum(scores) / len(scores))
    return sum(per_example) / len(per_example)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
