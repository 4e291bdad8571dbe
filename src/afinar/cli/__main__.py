"""`python -m afinar.cli ...`: what torchrun and `accelerate launch -m` start on every rank."""

import sys

from afinar.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
