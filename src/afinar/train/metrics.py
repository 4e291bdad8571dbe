"""metrics.jsonl: one JSON record per training step and held-out evaluation, as the loop writes
them, and the same records to the run's tracking tools."""

from __future__ import annotations

import json
from pathlib import Path

from afinar.train.tracking import Trackers


def _step_of(line: str) -> int | None:
    """The step of a metrics line; None for a line cut short by a kill mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Metrics:
    """metrics.jsonl writer; on resume, drops lines logged after the checkpoint. Each record
    also goes to the run's tracking tools (`report_to`), so they get the same numbers."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None,
                 trackers: Trackers | None = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers or Trackers()
        if enabled and keep_until_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if (step := _step_of(line)) is not None and step <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.trackers.log(record)
