"""Fixtures for every test folder (torch-free: tests/runtime runs without torch)."""

from __future__ import annotations

import logging

import pytest

_OUR_LOGGERS = ("crc_train", "crc_export", "crc_runtime")


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo what a CLI's logging setup did in this test.

    The CLIs attach handlers to the stream that is stderr when they run; under click's CliRunner that
    stream is closed when the command returns, and a later test's log line would hit it ("--- Logging
    error ---"). Each test gets back the handlers and levels it started with.
    """
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in _OUR_LOGGERS)]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
