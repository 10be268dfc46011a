"""Errors meant for the user: one line saying what was expected, what was found, and what to do.

A CLI catches :class:`UserError`, prints ``error: <message>`` to stderr and exits 1 with no traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, files or environment, explained in one line."""


class BundleError(UserError):
    """A bundle that cannot be used: bad manifest, missing or altered file, unusable artifact."""


class ImageError(UserError):
    """An image file that cannot be decoded or converted."""


class PairsError(UserError):
    """An input folder or pairs.csv that gives no usable pairs or breaks a rule."""


class BackendError(UserError):
    """An inference backend that cannot run what was asked (provider missing, wrong inputs)."""
