"""What the recipe's stages share (train/recipe.py builds it, train/loop.py runs it): the Session,
and the Schedule of epochs, steps, evaluations and checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from afinar.config import TrainConfig
from afinar.errors import AfinarError
from afinar.events import Listener, Log
from afinar.train import state as ckpt
from afinar.train.control import Control
from afinar.train.metrics import Metrics
from afinar.train.tracking import Trackers



@dataclass
class Schedule:
    """Which examples each epoch trains on, in how many steps, and when to evaluate and save.
    One epoch is every task example and that epoch's share of the replay set (a function of
    the epoch alone, so a resumed run sees the same examples)."""
    pool: list  # the task's tokenized examples, then the replay set's
    n_task: int
    replay: object | None
    micro_per_epoch: int  # micro-batches per epoch and process
    steps_per_epoch: int
    total_steps: int
    eval_steps: int
    save_steps: int

    @classmethod
    def for_run(cls, config: TrainConfig, data, replay, epochs: int, world: int) -> Schedule:
        schedule = cls(data.train + (replay.items if replay else []), len(data.train), replay,
                       0, 0, 0, 0, 0)
        n_epoch_items = len(schedule.members(0))
        schedule.micro_per_epoch = math.ceil(n_epoch_items / config.batch_size) // world
        if schedule.micro_per_epoch == 0:
            raise AfinarError(f"{n_epoch_items} training examples cannot feed {world} processes "
                              f"with batch_size {config.batch_size}", "lower batch_size")
        schedule.steps_per_epoch = math.ceil(schedule.micro_per_epoch
                                             / config.gradient_accumulation_steps)
        schedule.total_steps = epochs * schedule.steps_per_epoch
        if config.max_steps:
            schedule.total_steps = min(schedule.total_steps, config.max_steps)
        schedule.eval_steps = config.eval_steps or max(1, math.ceil(schedule.total_steps / 10))
        schedule.save_steps = config.save_steps or schedule.eval_steps
        return schedule

    def members(self, epoch: int) -> list[int]:
        return list(range(self.n_task)) + ([self.n_task + i for i in self.replay.for_epoch(epoch)]
                                           if self.replay else [])


@dataclass
class Session:
    """What the stages share. Each stage fills its part; later stages only read earlier parts
    (and `state`, the step counters a checkpoint saves)."""
    config: TrainConfig
    resume: bool
    emit: Listener
    trackers: Trackers
    control: Control = field(default_factory=Control)  # asked after every step
    base_answerer: Any = None  # what answers the preserve replay set (None: transformers)
    run: Path = Path()
    main: bool = True
    started: bool = False  # run.json exists: a failure from here on is recorded there
    # prepare
    device: Any = None
    resolved: Any = None
    tokenizer: Any = None
    data: Any = None  # PreparedData
    epochs: int = 0
    model_config: Any = None
    precision: str = "fp32"
    precision_choice: Any = None
    replay: Any = None
    # plan
    plan: Any = None
    checkpointing: bool = False
    compiled: bool = False
    # build
    accelerator: Any = None
    model: Any = None  # the (PEFT) model whose weights are saved
    loss_model: Any = None  # what the step calls: the objective's module, wrapped by accelerate
    objective: Any = None
    optimizer: Any = None
    scheduler: Any = None
    schedule: Schedule | None = None
    trainable: list = field(default_factory=list)
    counts: tuple[int, int] = (0, 0)  # trainable, total parameters
    lr: float = 0.0
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    metrics: Metrics | None = None
    # run
    last_train_loss: float | None = None

    def say(self, message: str, level: str = "info") -> None:
        self.emit(Log(level, message))
