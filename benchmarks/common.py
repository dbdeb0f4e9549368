"""What every benchmark part shares: the machine description, peak memory, a fresh child process.

Peak memory is a process's peak resident set size (VmHWM in /proc/self/status, else
`ru_maxrss`): LightGBM and torch allocate in C, which `tracemalloc` does not see, and pages of a
memory-mapped store count once touched. A part that reports peak memory measures in a fresh
interpreter (`run_child`), so that the figure is that measurement's own and not whatever the
parent held before.

Nothing here imports torch at module level: a child's baseline memory would include it.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from runfolder.errors import RunError

__all__ = [
    "ISIC2024_PATIENTS",
    "ISIC2024_ROWS",
    "REPO",
    "child_main",
    "cpu_count",
    "cpu_name",
    "machine",
    "peak_rss_bytes",
    "ru_maxrss_bytes",
    "run_child",
    "synchronize",
]

REPO = Path(__file__).resolve().parents[1]

ISIC2024_ROWS = 401_059
ISIC2024_PATIENTS = 1_042

# The last characters of a failed child's stderr kept in the error message.
_CHILD_STDERR_CHARS = 1500


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    """CPUs this process may run on (its affinity), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine() -> dict:
    """What the figures were measured on: cpu, cores, gpu (None without CUDA), torch, python."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_name(),
        "cores": cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def ru_maxrss_bytes() -> int:
    """This process's peak resident set size in bytes as `getrusage` reports it."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (VmHWM, else ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return ru_maxrss_bytes()


def synchronize(device) -> None:
    """Wait for queued CUDA work on `device` (a torch.device), so that a timer stops after it."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def run_child(target: str, kwargs: dict, *, label: str, error: type[Exception] = RunError) -> dict:
    """Call `target` ("package.module:function") with `kwargs` in a fresh Python interpreter.

    A plain subprocess, not multiprocessing: its peak memory is its own, and it works whatever the
    parent's `__main__` is (invoke, pytest, `python -`). The repository root is put on the child's
    PYTHONPATH so that `benchmarks` imports there as it does here.

    Args:
        target: the function to call; it takes JSON-ready keyword arguments and returns a
            JSON-ready dict.
        kwargs: its arguments.
        label: names the child in the error message.
        error: the exception raised when the child fails (each part raises its side's own).

    Returns:
        The function's dict.

    Raises:
        `error`: the child exited non-zero or returned nothing; the message holds the end of its
            stderr (the traceback).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    code = "from benchmarks.common import child_main; child_main()"
    with tempfile.TemporaryDirectory(prefix="lesionfuse-bench-child-") as tmp:
        # The result travels in a file: LightGBM and torch write to the child's stdout from C.
        result_path = Path(tmp) / "result.json"
        done = subprocess.run(
            [sys.executable, "-c", code, target, json.dumps(kwargs), str(result_path)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if done.returncode != 0 or not result_path.is_file():
            raise error(
                f"bench: the {label} child process failed (exit code {done.returncode}): "
                f"{done.stderr.strip()[-_CHILD_STDERR_CHARS:]}"
            )
        return json.loads(result_path.read_text())


def child_main(argv: list[str] | None = None) -> None:
    """The child's side of `run_child`: argv is target, JSON keyword arguments, result path."""
    target, kwargs, result_path = argv if argv is not None else sys.argv[1:4]
    module, name = target.split(":")
    function = getattr(importlib.import_module(module), name)
    result = function(**json.loads(kwargs))
    Path(result_path).write_text(json.dumps(result))
