"""Path confinement: no path from pairs.csv, a folder listing or a symlink may lead outside a root.

Two steps, because a folder may change while a run reads it. :meth:`Confined.check` vets a path when
the folder is listed (its verdict goes into the run summary); :meth:`Confined.open` opens it for reading
as one operation that cannot be raced: it walks the path one component at a time from a descriptor of
the root, never lets the kernel follow a symlink (``O_NOFOLLOW``), and resolves each symlink itself
against the root. A file swapped for a symlink to an outside file after the listing is refused, never
read, and nothing outside the root is ever opened.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_OUT = "outside folder"
MAX_SYMLINKS = 40  # as the kernel's own limit (ELOOP)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a FIFO never hangs


class Refused(Exception):
    """A path :meth:`Confined.open` will not open: why (to follow the path in a message) and the kind.

    Args:
        reason: What is wrong, e.g. ``escapes the input folder (a symlink to /etc/passwd)``.
        kind: The run summary's category (``outside folder``, ``not a file``).
    """

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


class Confined:
    """Resolve paths (symlinks included) and tell whether they stay inside one root folder.

    Parent folders are resolved once and cached, and so is each path's verdict, so a 100k-row
    pairs.csv costs about one lstat per distinct file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = os.path.realpath(root)
        self._prefix = self.root.rstrip(os.sep) + os.sep  # "/" stays "/", "/a" becomes "/a/"
        self._base = str(Path(root))  # the root as paths under it are spelt (folder / rel)
        # An absolute symlink target may name the root by its real path or as the user spelt it.
        self._aliases = {self._prefix, os.path.abspath(self._base).rstrip(os.sep) + os.sep}
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

    def open(self, path: str | os.PathLike) -> int:
        """Open a regular file under the root for reading; the returned descriptor is the caller's.

        Args:
            path: A path spelt as the root joined with a relative path (how pairs.py makes them).

        Raises:
            Refused: The path leads outside the root (at the time of opening), or is not a regular file.
            OSError: Not found, permission denied, too many symlinks, a name too long, ...
        """
        todo = _components(self._relative(path))
        dirs = [os.open(self.root, _DIR_FLAGS & ~os.O_NOFOLLOW)]  # the root itself is resolved already
        hops = 0
        try:
            while todo:
                name = todo.pop()
                if name == "..":
                    if len(dirs) == 1:
                        raise Refused(
                            "escapes the input folder (through ..); paths must stay inside it", _OUT
                        )
                    os.close(dirs.pop())
                    continue
                st = os.stat(name, dir_fd=dirs[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                    target = os.readlink(name, dir_fd=dirs[-1])
                    if os.path.isabs(target):
                        target = self._inside(target)
                        while len(dirs) > 1:
                            os.close(dirs.pop())
                    todo.extend(_components(target))
                    continue
                if todo:  # a folder on the way; O_NOFOLLOW: swapped for a symlink since the stat is ELOOP
                    dirs.append(os.open(name, _DIR_FLAGS, dir_fd=dirs[-1]))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    raise Refused("is a folder, not an image file", "not a file")
                if not stat.S_ISREG(st.st_mode):  # never opened: a device may act on open
                    raise Refused("is not a regular file (a FIFO, socket or device)", "not a file")
                fd = os.open(name, _FILE_FLAGS, dir_fd=dirs[-1])
                if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the stat and the open
                    os.close(fd)
                    raise Refused("is not a regular file (it changed while being opened)", "not a file")
                return fd
            raise Refused("is a folder, not an image file", "not a file")  # the path ends in . or ..
        finally:
            for fd in dirs:
                os.close(fd)

    def _inside(self, target: str) -> str:
        """An absolute symlink target as a path relative to the root, or :class:`Refused`."""
        spelt = target.rstrip(os.sep) + os.sep  # the root itself, spelt without the trailing /
        for alias in self._aliases:
            if spelt.startswith(alias):
                return spelt[len(alias) :]
        raise Refused(f"escapes the input folder (a symlink to {target}); paths must stay inside it", _OUT)

    def _relative(self, path: str | os.PathLike) -> str:
        text = os.fspath(path)
        if self._base == ".":
            if not os.path.isabs(text):
                return text
        elif text.startswith(self._base.rstrip(os.sep) + os.sep):
            return text[len(self._base.rstrip(os.sep)) + 1 :]
        raise ValueError(f"{text} is not spelt as a path under {self._base}")


def _components(path: str) -> list[str]:
    """The names along a relative path as a stack (the next one last); empty names and ``.`` dropped."""
    return [name for name in path.split(os.sep) if name not in ("", ".")][::-1]
