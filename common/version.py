"""The lesionfuse version that made an artifact (recorded in stores and resumable stages)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["lesionfuse_version"]


def lesionfuse_version() -> str:
    """The installed lesionfuse version, else the one in the checkout's pyproject, else
    "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("lesionfuse")
    except metadata.PackageNotFoundError:
        pass
    try:
        import tomllib

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        return str(tomllib.loads(pyproject.read_text())["project"]["version"])
    except (OSError, KeyError, ValueError):
        return "unknown"
