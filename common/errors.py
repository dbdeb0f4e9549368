"""The one base class of every error lesionfuse reports to a user."""

from __future__ import annotations

__all__ = ["LesionfuseError", "preview"]


class LesionfuseError(ValueError):
    """An input, file, artifact or setting lesionfuse cannot use.

    Each side subclasses it (`embed.errors.EmbedError`, `tabular.errors.DataError`,
    `runfolder.errors.RunError`); the commands catch this one type and print the message without a
    traceback. Messages name the parameter, column or path, the value received and, where it
    helps, the command that fixes it.
    """


def preview(values, limit: int = 5) -> str:
    """'3: a, b, c' style summary of offending values (a count, then the first few)."""
    values = [str(v) for v in values]
    shown = ", ".join(values[:limit])
    more = f", ... ({len(values) - limit} more)" if len(values) > limit else ""
    return f"{len(values)}: {shown}{more}"
