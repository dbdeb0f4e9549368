"""Exceptions of the image side (``embed``)."""

from __future__ import annotations

from common.errors import LesionfuseError

__all__ = [
    "EmbedError",
    "EmbedInterrupted",
    "StoreMismatchError",
]


class EmbedError(LesionfuseError):
    """An input, file or setting the image side cannot use.

    The message names the parameter or path, the value received and, where it helps,
    the command that fixes it.
    """


class StoreMismatchError(EmbedError):
    """A feature store (or a model) was made with other weights, preprocessing or shape."""


class EmbedInterrupted(EmbedError):
    """An embedding run stopped by SIGINT or SIGTERM after saving every row it had embedded;
    running the same command again embeds the rest."""
