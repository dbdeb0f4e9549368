"""The metadata side's own exception."""

from common.errors import LesionfuseError, preview

__all__ = ["DataError", "preview"]


class DataError(LesionfuseError):
    """A dataset spec, metadata table or tabular option is not usable.

    Messages name the parameter or column, the value received and, where rows are at fault, how
    many there are and the first few ids.
    """
