"""`report_to: [tensorboard, mlflow, wandb]`: runs reported to the tracking tools users watch.

The pipeline (afinar/pipeline.py) opens one `Trackers` and the recipe reports to it, at five places:

    trackers = Trackers.for_run(config)          # a missing library fails here, before training
    trackers.start(run, config.model_dump(mode="json"), say)   # run dir and config.yaml exist
    trackers.log(record)                         # every metrics.jsonl record, as written
    trackers.artifacts(run)                      # report.json/.md/.html after the evaluation
    trackers.finish("succeeded")                 # or "failed" / "interrupted"

Each tool is used through its own library, with defaults that never leave the machine:
TensorBoard event files in RUN/tensorboard/; MLflow to `sqlite:///RUN/mlflow.db` (artifacts in
RUN/mlruns/) unless MLFLOW_TRACKING_URI names the user's server; W&B offline in RUN/wandb/
unless the user logged in (WANDB_API_KEY) or chose WANDB_MODE. Metric names are metrics.jsonl's
own keys (train_loss, learning_rate, grad_norm, tokens_per_s, ..., eval_loss, eval_perplexity,
...) at the record's step; `type` and `step` are not metrics, and None values are left out.

A tracker that fails mid-run (disk full, a server gone) is dropped with one warning: a tracking
tool never costs a training run. Only the main process reports.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

from afinar.errors import AfinarError

Say = Callable[..., None]

TRACKING_DIRS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "wandb": "wandb"}
MLFLOW_DB = "mlflow.db"
REPORT_FILES = ("report.json", "report.md", "report.html")
MLFLOW_PARAM_LIMIT = 6000  # mlflow-skinny 3.x's MAX_PARAM_VAL_LENGTH; older servers allow 500

_EXIT_CODES = {"succeeded": 0, "failed": 1, "interrupted": 255}
_MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def _require(tool: str, module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AfinarError(
            f"report_to: {tool} needs the `{package}` package, which is not installed ({exc})",
            f"pip install 'afinar[tracking]' (all three tools), or pip install {package}"
        ) from None


def numbers(record: dict) -> dict[str, float]:
    """The metrics of a metrics.jsonl record: its numeric values but `type` and `step`."""
    return {k: float(v) for k, v in record.items()
            if k not in ("type", "step") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"lora": {"r": 16}} → {"lora.r": "16"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = "null" if value is None else str(value)
            # A long value (a list of target modules, a path) is cut, and says so.
            out[name] = text if len(text) <= MLFLOW_PARAM_LIMIT else (
                text[:MLFLOW_PARAM_LIMIT - 14] + "… (truncated)")
    return out


# --- the reporters: one class per tool, the same four methods ----------------------------------

class TensorBoardReporter:
    name = "tensorboard"

    def __init__(self):
        # torch's writer is TensorBoard's usual one; importing it fails without `tensorboard`.
        self._lib = _require("tensorboard", "torch.utils.tensorboard", "tensorboard")
        self.writer = None

    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int = 0) -> None:
        import yaml

        # purge_step: a resumed run drops the events logged after its checkpoint, as
        # metrics.jsonl does.
        self.writer = self._lib.SummaryWriter(log_dir=str(run_dir / TRACKING_DIRS[self.name]),
                                              purge_step=first_step or None)
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        self.writer.add_text("config", "```yaml\n" + text + "```", 0)  # markdown, as TB renders
        self.writer.flush()

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def artifact(self, path: Path) -> None:
        if path.suffix in (".md", ".json"):  # TensorBoard keeps text, not files
            self.writer.add_text(path.name, path.read_text(encoding="utf-8")
                                 if path.suffix == ".md" else
                                 "```json\n" + path.read_text(encoding="utf-8") + "\n```")

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.add_text("status", status)
            self.writer.close()


class MlflowReporter:
    name = "mlflow"

    def __init__(self):
        self._lib = _require("mlflow", "mlflow", "mlflow-skinny")
        self.client = self.run_id = None

    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int = 0) -> None:
        mlflow = self._lib
        from mlflow.entities import Param

        # MlflowClient, not the fluent mlflow.start_run(): no process-wide active run to leak
        # into the user's own code, or into the next run in the same process. The local store
        # is SQLite (MLflow 3 refuses its old file store unless told to), artifacts beside it.
        local = os.environ.get("MLFLOW_TRACKING_URI") is None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow_uri(run_dir)
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)  # "Creating initial tables..."
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "afinar")
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=(run_dir / TRACKING_DIRS[self.name]).resolve().as_uri()
            if local else None)
        run = self.client.create_run(experiment_id, run_name=run_name,
                                     tags={"afinar.run_dir": str(run_dir.resolve())})
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params at a time
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_dict(self.run_id, config, "config.json")  # the whole config, uncut

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        self.client.log_batch(self.run_id, metrics=[
            Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)])

    def artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="report")

    def finish(self, status: str) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, _MLFLOW_STATUS.get(status, "FAILED"))


class WandbReporter:
    name = "wandb"

    def __init__(self):
        self._lib = _require("wandb", "wandb", "wandb")
        self.run = self.report = None

    def start(self, run_dir: Path, config: dict, run_name: str, first_step: int = 0) -> None:
        wandb = self._lib
        # Nothing leaves the machine unless the user logged in or chose a mode themselves.
        chosen = os.environ.get("WANDB_MODE") or (
            "online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(  # dir=RUN: W&B writes its runs in RUN/wandb/
            project=os.environ.get("WANDB_PROJECT", "afinar"), name=run_name,
            config=config, dir=str(run_dir), mode=chosen, reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def artifact(self, path: Path) -> None:
        # One artifact of this run holds the report's files, logged when the run finishes.
        if self.report is None:
            self.report = self._lib.Artifact(f"report-{self.run.id}", type="evaluation")
        self.report.add_file(str(path))

    def finish(self, status: str) -> None:
        if self.run is not None:
            if self.report is not None:
                self.run.log_artifact(self.report)
            self.run.finish(exit_code=_EXIT_CODES.get(status, 1))


REPORTERS: dict[str, type] = {"tensorboard": TensorBoardReporter, "mlflow": MlflowReporter,
                              "wandb": WandbReporter}


def mlflow_uri(run_dir: Path) -> str:
    """The run's own MLflow store: `mlflow ui --backend-store-uri sqlite:///RUN/mlflow.db`."""
    return "sqlite:///" + str((Path(run_dir) / MLFLOW_DB).resolve())


def _millis() -> int:
    return int(time.time() * 1000)


# --- the fan-out the loop calls ----------------------------------------------------------------

class Trackers:
    """Every reporter of a run; a failing one is dropped with one warning, the others go on."""

    def __init__(self, names: list[str] | tuple[str, ...] = (), enabled: bool = True):
        # The libraries import here, so a missing one stops the run before any work.
        self.reporters = [REPORTERS[n]() for n in dict.fromkeys(names)] if enabled else []
        self.say: Say = lambda message, level="info": None
        self.started = False

    @classmethod
    def for_run(cls, config) -> "Trackers":
        """Main process only. The pipeline opens them; a `tune` trial runs the recipe alone,
        untracked: a measurement, not a run."""
        main = os.environ.get("RANK", "0") == "0"
        return cls(config.report_to, enabled=main)

    def start(self, run_dir: Path, config: dict, say: Say | None = None,
              first_step: int = 0) -> None:
        if say is not None:
            self.say = say
        self.started = True
        self._each("start", Path(run_dir), config, Path(run_dir).name, first_step)
        if self.reporters:
            self.say("reporting to " + ", ".join(_where(r, Path(run_dir)) for r in self.reporters))

    def log(self, record: dict) -> None:
        """One metrics.jsonl record (train or eval)."""
        if self.reporters and "step" in record:
            self._each("log", numbers(record), int(record["step"]))

    def artifacts(self, folder: Path) -> None:
        """The evaluation report's files in `folder`, those that exist."""
        for name in REPORT_FILES:
            if (Path(folder) / name).is_file():
                self._each("artifact", Path(folder) / name)

    def finish(self, status: str) -> None:
        if self.started:
            self._each("finish", status)
        self.reporters, self.started = [], False

    def _each(self, method: str, *args) -> None:
        for reporter in list(self.reporters):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the libraries' deprecation chatter
                    getattr(reporter, method)(*args)
            except Exception as exc:  # noqa: BLE001 (any tool's failure; training goes on)
                self.reporters.remove(reporter)
                self.say(f"{reporter.name}: {method} failed ({exc.__class__.__name__}: {exc}); "
                         f"no longer reporting to {reporter.name}, training goes on", "warning")
                if method != "finish":
                    try:  # close what it holds open
                        reporter.finish("failed")
                    except Exception:  # noqa: BLE001
                        pass


def _where(reporter, run_dir: Path) -> str:
    if reporter.name == "mlflow":
        return f"mlflow ({os.environ.get('MLFLOW_TRACKING_URI') or mlflow_uri(run_dir)})"
    if reporter.name == "wandb" and getattr(reporter, "run", None) is not None:
        return f"wandb ({reporter.run.settings.mode}, {run_dir / TRACKING_DIRS['wandb']})"
    return f"{reporter.name} ({run_dir / TRACKING_DIRS[reporter.name]})"
