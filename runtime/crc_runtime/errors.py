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
        super().__init__(message)
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


def printable(text: str) -> str:
    """``text`` safe to print and to write as UTF-8, undecodable bytes shown as ``\\xNN``.

    File names and a non-UTF-8 pairs.csv reach Python as lone surrogates (surrogateescape); printing
    them as they are would raise UnicodeEncodeError.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
