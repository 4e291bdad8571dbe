"""Stopping a run from outside, at a step: the server's pause and cancel.

    class FromMyQueue(Control):
        def requested(self):             # "pause", "cancel" or None; cheap, asked often
            ...
    fine_tune(config, control=FromMyQueue())

The loop asks after every step: a pause first checkpoints that step, so resuming loses nothing;
a cancel stops at once. The pipeline also asks for a cancel whenever the run reports progress
outside the steps (a search's trials, the base answers for `preserve`, the end-of-run
evaluation). Either ends the run with `Stopped`, a KeyboardInterrupt: run.json says interrupted
and the run can be resumed. A progress listener only listens.
"""

from __future__ import annotations


class Control:
    """Never asks the run to stop (the default)."""

    def requested(self) -> str | None:
        """"pause", "cancel", or None to go on."""
        return None


class Stopped(KeyboardInterrupt):
    """The run stopped because its control asked (`kind`: pause or cancel) at `step`."""

    def __init__(self, kind: str, step: int | None = None):
        super().__init__(kind)
        self.kind, self.step = kind, step
