"""The `afinar` command: one module per command group, each command parsing its options, calling
one library function and printing. No command holds logic the library lacks: the server and the
Python API call the same functions.

    validate.py   afinar validate                 data.py     afinar data convert|dedupe|split|synth
    train.py      afinar train, afinar demo       plan.py     afinar plan
    chat.py       afinar chat, afinar generate    evaluate.py afinar eval
    export.py     afinar export, afinar card      models.py   afinar models list|show|compare|tag|rm
    serve.py      afinar serve, afinar worker     common.py   what they share

Command modules never import this package (it imports them), so the tree has no import circle.
"""

from __future__ import annotations

import typer

from afinar.cli import chat, evaluate, export, serve, train, validate
from afinar.cli.data import data_app
from afinar.cli.models import models_app
from afinar.cli.plan import plan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune open LLMs from a JSONL file: validate, train, evaluate, keep "
                  "versions, chat, generate.")
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.command("plan")(plan)
app.command()(validate.validate)
app.command()(train.train)
app.command()(chat.chat)
app.command()(chat.generate)
app.command()(train.demo)
app.command("eval")(evaluate.eval_)
app.command()(export.export)
app.command()(export.card)
app.command()(serve.serve)
app.command()(serve.worker)


def main() -> None:  # pragma: no cover - console entry point
    app()
