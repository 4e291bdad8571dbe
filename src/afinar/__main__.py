"""`python -m afinar ...` runs the CLI (what the server uses to start exports)."""

from afinar.cli import app

app(prog_name="afinar")
