"""Where artifacts go: `<repo>/artifacts`, or `$LESIONFUSE_ARTIFACTS` when set."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["REPO", "artifacts_root", "run_dir", "stores_root"]

REPO = Path(__file__).resolve().parents[1]


def artifacts_root() -> Path:
    """The artifacts folder (`LESIONFUSE_ARTIFACTS` moves it, e.g. to a bigger disk)."""
    return Path(os.environ.get("LESIONFUSE_ARTIFACTS", REPO / "artifacts")).expanduser()


def run_dir(run: str | Path) -> Path:
    """`artifacts/runs/<run>`; a path with a separator is taken as it is."""
    run = Path(run)
    if run.is_absolute() or len(run.parts) > 1:
        return run
    return artifacts_root() / "runs" / run


def stores_root() -> Path:
    """`artifacts/stores`: where feature stores go."""
    return artifacts_root() / "stores"
