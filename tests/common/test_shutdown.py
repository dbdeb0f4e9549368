"""The command line's exit skips the interpreter's last garbage collections (`common.shutdown`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# An object in a reference cycle, alive until the process ends: only the shutdown's collection
# would free it (and run its finalizer, which says so on stdout).
SCRIPT = """
import os, sys

{setup}


class Noisy:
    def __del__(self, write=os.write):
        write(1, b"finalized\\n")


holder = Noisy()
holder.me = holder
print("done", flush=True)
"""


def _run(setup: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(setup=setup)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_without_it_the_shutdown_collects_the_cycle():
    assert _run("pass") == ["done", "finalized"]


@pytest.mark.parametrize(
    "setup",
    [
        "from common.shutdown import skip_final_collection\n"
        "skip_final_collection()\nskip_final_collection()",
        "import tasks  # the command line registers it on import",
    ],
)
def test_with_it_the_shutdown_leaves_the_cycle_to_the_operating_system(setup):
    assert _run(setup) == ["done"]
