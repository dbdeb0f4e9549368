"""The fusion side's own exception."""


class RunError(ValueError):
    """A run, its artifacts or its options are not usable."""
