"""The fusion side's exception: a run, its artifacts or its options are not usable."""

from runfolder.errors import RunError

__all__ = ["RunError"]
