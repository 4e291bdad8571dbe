"""Terminal output for the CLI: the live training progress bar and the error printer.

Only the CLI imports this; the library reports through events (afinar.events).
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from afinar import events as ev

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class TrainProgress:
    """Turns training events into a rich progress bar (or periodic lines when not a terminal)."""

    def __init__(self):
        self.live = console.is_terminal
        self.evaluation = EvalProgress()  # train evaluates at the end
        self.progress = None
        self.task = None
        self.eval_loss = None
        self.total = 0
        self._last_printed = -1

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.Log):
            style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
            prefix = "warning: " if event.level == "warning" else ""
            console.print(f"[{style}]{prefix}{event.message}[/]")
        elif isinstance(event, ev.Start):
            self._start(event)
        elif isinstance(event, ev.Step):
            self._step(event)
        elif isinstance(event, ev.Eval):
            metrics = event.metrics
            self.eval_loss = metrics["eval_loss"]
            if not self.live:
                if "eval_preference_accuracy" in metrics:
                    detail = (f"preference accuracy {metrics['eval_preference_accuracy']:.1%}, "
                              f"reward margin {metrics['eval_reward_margin']:.3f}")
                else:
                    detail = f"token accuracy {metrics['eval_token_accuracy']:.1%}"
                console.print(f"  eval step {event.step}: held-out loss "
                              f"{metrics['eval_loss']:.4f}, {detail}")
        elif isinstance(event, ev.End):
            if self.progress:
                self.progress.stop()
        elif isinstance(event, (ev.EvalPhase, ev.EvalProgress, ev.EvalDone)):
            self.evaluation(event)

    def _start(self, event: ev.Start) -> None:
        self.total = event.total_steps
        console.print(
            f"Training {event.trainable_params:,} of {event.total_params:,} parameters on "
            f"{event.train_examples} examples ({event.held_out_examples} held out): "
            f"{event.total_steps} steps, {event.epochs} epochs, lr {event.learning_rate:g}, "
            f"{event.precision} on {event.device}"
            + (f" x{event.processes}" if event.processes > 1 else ""))
        console.print(f"Run directory: {event.run_dir}")
        if self.live:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                TaskProgressColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"), console=console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total,
                                               completed=event.start_step, info="", eta="?")

    def _step(self, event: ev.Step) -> None:
        held = f" held-out {self.eval_loss:.3f}" if self.eval_loss is not None else ""
        info = (f"epoch {event.epoch:.2f} loss {event.metrics['train_loss']:.3f}{held} "
                f"{event.metrics['tokens_per_s']:.0f} tok/s")
        if self.progress:
            self.progress.update(self.task, completed=event.step, info=info,
                                 eta=_fmt_eta(event.eta_s))
        else:
            every = max(1, self.total // 10)
            if event.step % every == 0 or event.step == self.total:
                console.print(f"  step {event.step}/{self.total} {info} "
                              f"ETA {_fmt_eta(event.eta_s)}")


class EvalProgress:
    """Evaluation events: a bar per generation task (or start/end lines when not a terminal)."""

    def __init__(self):
        self.live = console.is_terminal
        self.progress = None
        self.tasks: dict[str, int] = {}

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, (ev.EvalPhase, ev.Log)):
            console.print(f"[dim]{escape(event.message)}[/]")
        elif isinstance(event, ev.EvalProgress):
            self._progress(event)
        elif isinstance(event, ev.EvalDone) and self.progress:
            self.progress.stop()
            self.progress = None

    def _progress(self, event: ev.EvalProgress) -> None:
        name, done, total = event.task, event.done, event.total
        if not self.live:
            if done in (0, total):
                console.print(f"  {name}: {done}/{total}")
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"),
                                     TimeElapsedColumn(), console=console, transient=True)
            self.progress.start()
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done)


def user_errors(func):
    """For CLI commands: user mistakes print one clear message and exit 1; bugs keep their
    traceback; Ctrl-C exits 130."""
    from afinar.errors import AfinarError

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except AfinarError as exc:
            print_error(exc)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def print_error(exc) -> None:
    from afinar.errors import DataError

    report = getattr(exc, "report", None) if isinstance(exc, DataError) else None
    if report is not None:
        print_issues(report.issues)
    console.print(f"[bold red]error:[/] {escape(exc.message)}")
    if exc.hint:
        console.print(f"  [dim]hint: {escape(exc.hint)}[/]")


def print_issues(issues, limit: int = 200) -> None:
    for issue in issues[:limit]:
        color = "red" if issue.severity == "error" else "yellow"
        console.print(f"[{color}]{issue.severity}[/] {escape(str(issue))}", soft_wrap=True)
    if len(issues) > limit:
        console.print(f"... and {len(issues) - limit} more")
