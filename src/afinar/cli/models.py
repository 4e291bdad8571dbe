"""`afinar models ...`: list, show, compare, tag and remove registered model versions.

afinar/cli/__init__.py mounts this with `app.add_typer(models_app, name="models")`; the
commands only format what afinar.versions returns.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import List

import typer
from rich.markup import escape
from rich.table import Table

from afinar import rundir
from afinar.console import out, user_errors
from afinar.errors import AfinarError
from afinar.versions import Version, compare_rows, metric_direction, open_registry

models_app = typer.Typer(no_args_is_help=True,
                         help="Registered model versions (trained runs): list, compare, tag, rm.")

_KEY_SUFFIXES = ("adherence", "checks_pass_rate")
_MAX_KEY_COLUMNS = 3


@models_app.command("list")
@user_errors
def list_versions():
    """Every registered version, newest first, with its key metrics."""
    with open_registry() as reg:
        versions = reg.list()
    if not versions:
        out.print("No model versions registered yet; `afinar train` registers each run.")
        return
    keys = _key_metrics(versions)
    table = Table(box=None, header_style="bold")
    # Short cells never wrap; when the terminal is narrow the names and the path fold instead.
    for title in ("id", "tags", "status", "base model", "data", "created", *keys, "path"):
        table.add_column(title, overflow="fold", no_wrap=title in ("id", "status"))
    for v in versions:
        table.add_row(v.id, escape(", ".join(v.tags)), _status(v.status),
                      escape(v.base_model or "-"), escape(Path(v.data_path).name if v.data_path
                                                          else "-"),
                      _when(v.started_at), *(_fmt(v.metrics.get(k)) for k in keys),
                      escape(v.path))
    out.print(table)


@models_app.command()
@user_errors
def show(ref: str = typer.Argument(..., help="Version id (v3 or 3), tag, or run directory."),
         as_json: bool = typer.Option(False, "--json", help="Print the version as JSON.")):
    """Everything recorded about one version: data, timings, metrics, config."""
    with open_registry() as reg:
        v = reg.get(ref)
    if as_json:
        out.print_json(json.dumps(dataclasses.asdict(v), ensure_ascii=False))
        return
    out.print(f"[bold]{v.id}[/]" + (f"  tags: {escape(', '.join(v.tags))}" if v.tags else ""))
    fields = [("status", _status(v.status)), ("path", escape(v.path)),
              ("base model", escape(v.base_model or "-")), ("method", escape(v.method or "-")),
              ("data", escape(v.data_path or "-")), ("data sha256", v.data_sha256 or "-"),
              ("data size", "-" if v.data_size is None else f"{v.data_size:,} bytes"),
              ("started", _when(v.started_at)), ("finished", _when(v.finished_at))]
    if v.error:
        fields.append(("error", f"[red]{escape(v.error)}[/]"))
    for name, value in fields:
        out.print(f"  {name + ':':<13}{value}")
    if v.metrics:
        out.print("[bold]metrics[/]")
        for name in sorted(v.metrics):
            out.print(f"  {escape(name)}: {_fmt(v.metrics[name])}")
    if v.config:
        out.print("[bold]config[/]")
        out.print(escape(v.config.rstrip()), soft_wrap=True)


@models_app.command()
@user_errors
def compare(refs: List[str] = typer.Argument(..., help="Two or more versions (id, tag, path)."),
            as_json: bool = typer.Option(False, "--json", help="Print the table as JSON.")):
    """Metrics of several versions side by side; the best value of each row in green."""
    with open_registry() as reg:
        versions = [reg.get(ref) for ref in refs]
    rows = compare_rows(versions)
    if as_json:
        out.print_json(json.dumps({
            "versions": [v.id for v in versions],
            "rows": [{"metric": name, "better": metric_direction(name), "values": values}
                     for name, values in rows]}))
        return
    table = Table(box=None, header_style="bold")
    table.add_column("metric")
    for v in versions:
        table.add_column(v.id + (f" ({', '.join(v.tags)})" if v.tags else ""), justify="right")
    for name, values in rows:
        best = _best(name, values)
        table.add_row(escape(name), *(f"[bold green]{_fmt(x)}[/]" if i in best else _fmt(x)
                                      for i, x in enumerate(values)))
    out.print(table)
    if not rows:
        out.print("[dim]no metrics recorded for these versions[/]")


@models_app.command("rm")
@user_errors
def remove(ref: str = typer.Argument(..., help="Version id (v3 or 3), tag, or run directory."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Delete without asking."),
           keep_files: bool = typer.Option(False, "--keep-files",
                                           help="Only unregister; leave the run directory.")):
    """Unregisters a version and deletes its run directory (asks first unless --yes)."""
    with open_registry() as reg:
        v = reg.get(ref)
        run = Path(v.path)
        delete = not keep_files and run.exists()
        if delete and not (run.is_dir() and rundir.is_run_dir(run)):
            # Only ever rmtree something training wrote: a path that no longer looks like a run
            # directory may now be anything (a reused folder, a home directory).
            raise AfinarError(f"{run} is no longer a run directory; refusing to delete it",
                              f"unregister only with `afinar models rm {v.id} --keep-files`")
        if delete and not yes:
            status = f" (status: {v.status})" if v.status and v.status != "succeeded" else ""
            if not typer.confirm(f"Delete {v.id}{status} and all files in {run}?"):
                out.print("Nothing deleted.")
                raise typer.Exit(1)
        if delete:
            shutil.rmtree(run)
        reg.remove(v.id)
    where = escape(str(run))
    out.print(f"Removed {v.id} and deleted {where}" if delete else
              f"Removed {v.id} from the registry; files kept in {where}" if run.exists() else
              f"Removed {v.id} from the registry ({where} was already gone)")


@models_app.command()
@user_errors
def tag(ref: str = typer.Argument(..., help="Version id (v3 or 3), tag, or run directory."),
        name: str = typer.Argument(..., help="Tag to point at it (moves if already used).")):
    """Names a version, e.g. `afinar models tag v3 prod`; the tag moves if it was elsewhere."""
    with open_registry() as reg:
        v = reg.tag(ref, name)
    out.print(f"{escape(name)} -> {v.id} ({escape(v.path)})")


@models_app.command()
@user_errors
def untag(name: str = typer.Argument(..., help="Tag to remove.")):
    """Removes a tag; the version itself stays."""
    with open_registry() as reg:
        v = reg.untag(name)
    out.print(f"Removed tag {escape(name)} from {v.id}")


def _key_metrics(versions: list[Version]) -> list[str]:
    names = {n for v in versions for n in v.metrics}
    loss = ["eval_loss"] if "eval_loss" in names else (
        ["best_eval_loss"] if "best_eval_loss" in names else [])
    scores = sorted(n for n in names if n.endswith(_KEY_SUFFIXES))
    return (loss + scores)[:_MAX_KEY_COLUMNS]


def _best(name: str, values: list) -> set[int]:
    direction = metric_direction(name)
    numbers = {i: x for i, x in enumerate(values)
               if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x}
    if direction is None or len(numbers) < 2 or len(set(numbers.values())) < 2:
        return set()  # nothing to choose between
    target = (min if direction == "lower" else max)(numbers.values())
    return {i for i, x in numbers.items() if x == target}


def _fmt(value) -> str:
    if value is None:
        return "[dim]-[/]"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.2f}" if abs(value) < 1000 \
            else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return escape(str(value))


def _status(status: str | None) -> str:
    color = {"succeeded": "green", "failed": "red", "interrupted": "yellow",
             "running": "cyan"}.get(status or "", "dim")
    return f"[{color}]{escape(status or '-')}[/]"


def _when(stamp: str | None) -> str:
    if not stamp:
        return "-"
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return escape(stamp)
