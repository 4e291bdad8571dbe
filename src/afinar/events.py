"""What a run reports while it works: one small type per kind of event.

    def on_event(event):
        if isinstance(event, Step):
            print(event.step, event.total_steps, event.metrics["train_loss"])
        elif isinstance(event, Log):
            print(event.level, event.message)

    fine_tune(config, on_event=on_event)

Training sends Start, RunDir (run.json exists), Step, Eval (held-out loss), Checkpoint and End;
an evaluation EvalPhase, EvalProgress and EvalDone; a search TuneTrial (a trial's own events,
wrapped so nothing takes them for the run's); anything may send Log. Listeners only listen:
stopping a run is its control's job (train/control.py).

Each event also reads like the dict it replaced: `event["type"]`, `event["train_loss"]`,
`event.get("eval_loss")` and `event.to_dict()` give the flat record the CLI, the server and
scripts written before these types read (a Step's metrics and an End's summary sit at the top
level there, as in metrics.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, ClassVar


def _flat(**kwargs):
    """A field whose dict is spread into the record (metrics, a summary)."""
    return field(metadata={"flat": True}, **kwargs)


@dataclass(frozen=True)
class Event:
    type: ClassVar[str] = "event"

    def to_dict(self) -> dict:
        record = {"type": self.type}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("flat"):
                record.update(value)
            else:
                record[f.name] = value.to_dict() if isinstance(value, Event) else value
        return record

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __contains__(self, key: str) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)


Listener = Callable[[Event], None]


@dataclass(frozen=True)
class Log(Event):
    type: ClassVar[str] = "log"
    level: str  # info, warning, error
    message: str


@dataclass(frozen=True)
class Start(Event):
    """The steps begin (from `start_step` when resumed)."""
    type: ClassVar[str] = "start"
    run_dir: str
    total_steps: int
    epochs: int
    steps_per_epoch: int
    train_examples: int
    held_out_examples: int
    trainable_params: int
    total_params: int
    learning_rate: float
    precision: str
    device: str
    processes: int
    start_step: int
    data_report: dict


@dataclass(frozen=True)
class RunDir(Event):
    """The run directory and its run.json (status running) exist."""
    type: ClassVar[str] = "run_dir"
    run_dir: str


@dataclass(frozen=True)
class Step(Event):
    """One optimizer step done: its metrics record (train_loss, learning_rate, grad_norm,
    tokens_per_s, ...; the objective's own) and the time left."""
    type: ClassVar[str] = "step"
    step: int
    epoch: float
    metrics: dict = _flat()
    total_steps: int = 0
    eta_s: float = 0.0


@dataclass(frozen=True)
class Eval(Event):
    """A held-out evaluation during training (eval_loss, eval_token_accuracy, ...)."""
    type: ClassVar[str] = "eval"
    step: int
    metrics: dict = _flat()
    best_eval_loss: float | None = None
    best_step: int | None = None


@dataclass(frozen=True)
class Checkpoint(Event):
    type: ClassVar[str] = "checkpoint"
    step: int
    path: str
    train_loss: float | None


@dataclass(frozen=True)
class End(Event):
    """Training finished: the run's summary (what run.json records)."""
    type: ClassVar[str] = "end"
    run_dir: str
    summary: dict = _flat()


@dataclass(frozen=True)
class EvalPhase(Event):
    type: ClassVar[str] = "eval_phase"
    message: str


@dataclass(frozen=True)
class EvalProgress(Event):
    type: ClassVar[str] = "eval_progress"
    task: str
    done: int
    total: int


@dataclass(frozen=True)
class EvalDone(Event):
    type: ClassVar[str] = "eval_done"
    output: str
    summary: dict


@dataclass(frozen=True)
class TuneTrial(Event):
    """A search trial's own event, wrapped: not the run's progress, job or checkpoint."""
    type: ClassVar[str] = "tune_trial"
    trial: int
    trials: int
    event: Event
