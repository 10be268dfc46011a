"""Path confinement: no path from pairs.csv, a folder listing or a symlink may lead outside a root."""

from __future__ import annotations

import os
import stat


class Confined:
    """Resolve paths (symlinks included) and tell whether they stay inside one root folder.

    Parent folders are resolved once and cached, and so is each path's verdict, so a 100k-row
    pairs.csv costs about one lstat per distinct file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep  # "/" stays "/", "/a" becomes "/a/"
        self._dirs: dict[str, str] = {}
        self._verdicts: dict[str, tuple[str, str] | None] = {}

    def inside(self, real: str) -> bool:
        """Whether a resolved path lies strictly inside the root."""
        return real.startswith(self._prefix) and real != self.root

    def check(self, path: str, shown: str) -> tuple[str, str] | None:
        """None if ``path`` is a regular file inside the root, else (``shown`` + what is wrong, kind)."""
        verdict = self._verdicts.get(path, False)
        if verdict is False:
            verdict = self._verdicts[path] = self._check(path)
        return None if verdict is None else (f"{shown} {verdict[0]}", verdict[1])

    def _check(self, path: str) -> tuple[str, str] | None:
        try:
            head, tail = os.path.split(path)
            if tail in ("", ".", ".."):
                real, link = os.path.realpath(path), True
            else:
                real_head = self._dirs.get(head)
                if real_head is None:
                    real_head = self._dirs[head] = os.path.realpath(head)
                real, link = os.path.join(real_head, tail), False
            # Nothing outside the root is ever opened or stat'ed: check where the path leads first.
            if self.inside(real) and not link:
                mode = os.lstat(real).st_mode
                if stat.S_ISLNK(mode):
                    real, link = os.path.realpath(real), True
            if not self.inside(real):
                return (
                    f"escapes the input folder (resolves to {real}); paths must stay inside it",
                    "outside folder",
                )
            if link:
                mode = os.stat(real).st_mode
        except FileNotFoundError:
            return "not found", "missing file"
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte; OSError: name too long, loops, ...
            return f"cannot be looked up ({exc})", "bad path"
        if stat.S_ISDIR(mode):
            return "is a folder, not an image file", "not a file"
        if not stat.S_ISREG(mode):
            return "is not a regular file (a FIFO, socket or device)", "not a file"
        return None
