"""Fixtures for every test folder (torch-free: tests/runtime runs without torch)."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

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


def _clone(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        try:
            os.link(path, dst / path.name)
        except OSError:  # another file system
            shutil.copy2(path, dst / path.name)
    return dst


@pytest.fixture
def clone_run(tmp_path: Path) -> Callable[[Path], Path]:
    """``clone_run(run_dir)``: a copy of a run dir made of hard links (cheap), in this test's tmp_path.

    Give one of its files new content by unlinking it first, never by writing into it: that would change
    the session's original run too.
    """
    count = iter(range(1000))
    return lambda src: _clone(Path(src), tmp_path / f"run-{next(count)}")
