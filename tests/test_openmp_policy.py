"""`import afinar` makes OpenMP threads sleep when idle (bench/bench_share_cores.py measures why)
before torch loads OpenMP, and leaves a user's own setting alone."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "import afinar, os, torch; print(os.environ['OMP_WAIT_POLICY'])"


def _policy(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_idle_threads_sleep_unless_the_user_says_otherwise():
    assert _policy(None) == "PASSIVE"
    assert _policy("ACTIVE") == "ACTIVE"
