"""Errors meant for the user: one line saying what was expected, what was found, and what to do.

A CLI catches :class:`UserError`, prints ``error: <message>`` to stderr and exits 1 with no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment, explained in one line.

    Args:
        message: The line shown to the user: the file, what is wrong, what to do.
        kind: A short category for the summary's "skipped by reason" counts (e.g. ``truncated``).
    """

    kind = "error"

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(printable(message))  # one line, whatever file names or ids it quotes
        if kind is not None:
            self.kind = kind


class BundleError(UserError):
    """A bundle that cannot be used: bad manifest, missing or altered file, unusable artifact."""


class ImageError(UserError):
    """An image file that cannot be decoded or converted."""

    kind = "bad image"


class PairsError(UserError):
    """An input folder or pairs.csv that gives no usable pairs or breaks a rule."""


class BackendError(UserError):
    """An inference backend that cannot run what was asked (provider missing, wrong inputs)."""


def os_reason(exc: OSError) -> str:
    """Why a file operation failed, lower case, for one-line messages: ``cannot read (permission denied)``."""
    return (exc.strerror or str(exc)).lower()


def printable(text: str) -> str:
    """``text`` safe to print on one line: undecodable bytes and control characters shown escaped.

    File names and a non-UTF-8 pairs.csv reach Python as lone surrogates (surrogateescape); printing
    them as they are would raise UnicodeEncodeError, and a line break would split the one line.
    """
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text.translate(_CONTROLS)


# Line breaks and other control characters (from ids or file names) would break the one-line rule.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}
