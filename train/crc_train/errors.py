"""User-facing errors: the CLI prints their one-line message and exits 1; anything else is a bug.

Torch-free, so the CLI can catch them without importing the training stack.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "DataError", "DivergedError", "UserError"]


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
