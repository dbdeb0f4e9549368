"""The run folder's exception: a run, one of its stages' files, or a command's option is not
usable."""

from __future__ import annotations

from common.errors import LesionfuseError

__all__ = ["RunError"]


class RunError(LesionfuseError):
    """A run folder, one of its stages' artifacts, or a command's option is not usable.

    Messages name the run or the file, what is wrong and the command that makes or remakes it.
    """
