"""The metadata side's own exception."""


class DataError(ValueError):
    """A dataset spec, metadata table or tabular option is not usable.

    Messages name the parameter or column, the value received and, where rows are at fault, how
    many there are and the first few ids.
    """


def preview(values, limit: int = 5) -> str:
    """'3 ids: a, b, c' style summary of offending values for an error message."""
    values = [str(v) for v in values]
    shown = ", ".join(values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"{len(values)}: {shown}{more}"
