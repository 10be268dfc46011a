"""Fixtures for every test folder (torch-free: tests/runtime runs without torch)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

_OUR_LOGGERS = ("crc_train", "crc_export", "crc_runtime")

# A shell that runs a job in the background (``cmd &``, as a CI wrapper may) sets SIGINT to ignored, the
# children inherit that, and Python then keeps ignoring Ctrl-C: a test that sends SIGINT would see the
# child run to its end. Children of such tests run this first, which gives Ctrl-C its usual meaning back.
_RESTORE_CTRL_C = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "


@pytest.fixture
def python_c() -> Callable[..., list[str]]:
    """``python_c(code, *args)``: the argv of ``python -c code args`` in which Ctrl-C (SIGINT) raises
    KeyboardInterrupt, whatever the test runner's own SIGINT disposition."""
    return lambda code, *args: [sys.executable, "-c", _RESTORE_CTRL_C + code, *(str(a) for a in args)]


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
