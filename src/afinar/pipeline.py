"""The product around a training run: [search] → train → record → evaluate → card.

    from afinar.pipeline import fine_tune, evaluate_run
    result = fine_tune(TrainConfig(data="examples/soporte-triaje/data.jsonl"))
    result.run_dir, result.summary, result.report      # the report: base vs tuned, when it ran
    report = evaluate_run("runs/soporte", data="other.jsonl")    # `afinar eval`

`afinar train`, the server's jobs, the demo and `afinar.train` call `fine_tune`; it is the only
place that strings the stages together:

    tune      `tune: true`: a search picks learning rate and epochs (afinar/tune.py), whose
              trials run the recipe alone: no version, no tracking, no evaluation of theirs
    train     the recipe (afinar/train/recipe.py): the run directory and its weights
    record    the model-version registry and the model card (`refresh_records`, the one place
              that writes either), when the run starts, fails, ends and is evaluated
    evaluate  base against tuned on the run's held-out split (afinar/evaluation/)

The tracking tools (`report_to`) are opened here, so a missing library stops the run before any
work, and get the evaluation's reports as artifacts.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from afinar import rundir
from afinar.config import TrainConfig
from afinar.engines import replay_answerer
from afinar.errors import AfinarError
from afinar.events import Event, Listener, Log, RunDir, Step
from afinar.train.control import Control, Stopped
from afinar.train.recipe import TrainResult, is_main_rank, settle_config
from afinar.train.recipe import train as train_recipe
from afinar.train.tracking import Trackers



def fine_tune(config: TrainConfig, on_event: Listener | None = None, resume: bool = False,
              control: Control | None = None) -> TrainResult:
    """Searches (when asked), trains, records the version, evaluates and writes the card.

    A run that fails or is interrupted is recorded as such (run.json and the registry), so
    nothing half-trained looks finished; `resume=True` continues from its last checkpoint.
    `control` pauses or cancels the run from outside (train/control.py): the recipe asks it
    after every step, and this pipeline asks for a cancel at every other progress report.
    """
    emit = on_event or (lambda event: None)
    control = control or Control()
    trackers = Trackers.for_run(config)  # report_to: a missing library stops the run here
    config = settle_config(config, resume)
    run = Path(config.output)

    def events(event: Event) -> None:
        if isinstance(event, RunDir):  # run.json exists: the registry shows the run training
            refresh_records(run, emit, card=False)
        emit(event)
        if not isinstance(event, Step) and control.requested() == "cancel":  # steps: the loop
            raise Stopped("cancel")
    if config.tune and not resume:
        from afinar.tune import tune_config

        # Short runs on the training part pick learning rate and epochs; the run below uses
        # the winner, and its saved config says so (numbers, tune: false).
        config, _ = tune_config(config, run, on_event=events if is_main_rank() else None)
    try:
        result = train_recipe(config, events, resume, trackers, control,
                              base_answerer=replay_answerer(config))
    except BaseException as exc:
        trackers.finish("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed")
        if is_main_rank() and (run / rundir.RUN_FILE).is_file():
            refresh_records(run, emit, card=False)
        raise
    if result.is_main_process:
        refresh_records(result.run_dir, emit)
    if result.is_main_process and config.evaluate and result.summary.get("held_out_examples"):
        # The model is trained and saved whatever happens from here on.
        try:
            result.report = _evaluate_finished_run(result.run_dir, events, config.engine)
            trackers.artifacts(result.run_dir)  # report.json/.md/.html, those it wrote
        except BaseException:
            trackers.finish("failed")
            raise
    elif result.is_main_process and config.evaluate:
        emit(Log("warning", "no held-out example is left (held_out_fraction 0, or every one "
                 "longer than max_seq_length with overflow drop): the end-of-run evaluation was "
                 "skipped; run `afinar eval RUN --data FILE` with a held-out file"))
    trackers.finish("succeeded")
    return result


def evaluate_run(model: str, on_event: Listener | None = None,
                 notify: Callable[[str], None] = print, engine: str = "auto", **options):
    """afinar.evaluation.evaluate with answers from `engine` (afinar.engines), then the
    registry (the report of a run's own held-out split is the one its version shows) and the
    model card (when the report went to the run)."""
    from afinar.engines import answerer_for, check_engine
    from afinar.evaluation.evaluator import evaluate

    check_engine(engine)
    report = evaluate(model, on_event=on_event, notify=notify,
                      answerer=lambda loaded: answerer_for(loaded, engine, notify), **options)
    if report.run_dir is not None:
        refresh_records(report.run_dir, lambda event: notify(event.message),
                        registry=report.is_default_eval,
                        card=report.output.resolve() == report.run_dir.resolve())
    return report


def refresh_records(run: Path, emit: Listener, registry: bool = True, card: bool = True) -> None:
    """The registry's entry for the run and RUN/README.md, from what the run directory holds
    now; a problem with either is a warning, never the run's failure."""
    if registry:
        from afinar.versions import open_registry

        try:
            with open_registry() as versions:
                versions.record_run(run)
        except (AfinarError, OSError, sqlite3.Error) as exc:
            emit(Log("warning", f"could not record the run in the registry: {exc}"))
    if card:
        from afinar.model_card import try_write_card

        try_write_card(run, run, warn=lambda message: emit(Log("warning", message)))


def _evaluate_finished_run(run: Path, emit: Listener, engine: str):
    """The end-of-run evaluation; its failure is a warning: the run itself is complete."""
    try:
        return evaluate_run(str(run), on_event=emit, engine=engine,
                            notify=lambda message: emit(Log("info", message)))
    except AfinarError as exc:
        emit(Log("warning", f"end-of-run evaluation failed: {exc.message}; the run itself is "
                 f"complete (retry with `afinar eval {run}`)"))
        return None
