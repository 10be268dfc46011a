"""User-facing errors: the CLI prints their one-line message and exits 1; anything else is a bug.

Torch-free, so the CLI can catch them without importing the training stack.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "DivergedError", "UserError", "first_line", "shown"]


class UserError(Exception):
    """A problem the user can fix; the message is one line saying what to do."""


class ConfigError(UserError, ValueError):
    """An impossible configuration value."""


class DataError(UserError):
    """Missing or unreadable data files, an unknown split."""


class CheckpointError(UserError):
    """A missing, corrupt or incompatible checkpoint."""


class DivergedError(UserError):
    """The training loss (or the validation loss) became NaN or infinite: training cannot go on."""


def shown(name: object) -> str:
    """A name read from a file or a folder listing, fit for a one-line message: as it is, or its repr
    when it holds a line break, another control character or an undecodable byte."""
    text = str(name)
    return text if text.isprintable() else repr(text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
