"""The fusion side's exception: `RunError` (its home is `runfolder.errors`): a run, its artifacts
or its options not usable."""

from runfolder.errors import RunError

__all__ = ["RunError"]
