"""The fusion side's exception: a run, its artifacts or its options are not usable."""

from common.errors import RunError

__all__ = ["RunError"]
