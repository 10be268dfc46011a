"""Crash-safe, resumable predictions CSV: rows go to ``<path>.partial``; the final name appears at the end.

Layout while a run is going (all next to the output path, nowhere else):

- ``<path>.partial``: the header, then one CSV row per processed pair, appended and fsynced per batch.
  The run holds an exclusive lock on it (``flock``) from start to end, so a second run with the same
  ``--output`` stops at once with one line instead of mixing its rows into the first run's file.
- ``<path>.partial.json``: the run key (columns, bundle and artifact identity) written once at the start,
  so ``--resume`` refuses to mix rows of two different models.

A killed process therefore leaves only these two files; the final name never holds a half-written file.
On resume the partial rows are read back (a torn last record is cut off), their ids are skipped, and new
rows are appended. :meth:`PredictionWriter.finalize` puts the rows in pair order (the order of the input
listing), so the final file is byte for byte the file an uninterrupted run writes. A write that fails
(disk full) leaves the partial as it was before that batch, so ``--resume`` goes on from there.

:func:`check_outputs` refuses, before anything is written, an output path that is one of the run's
inputs, a bundle file, or the other output, and a name too long for the files written next to it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from .atomic import atomic_write_text
from .errors import UserError, os_reason

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
KEY_SUFFIX = ".partial.json"
_TEMP_EXTRA = len(".") + len(".tmp-") + 8  # atomic_path's temp name: ".<name>.tmp-" + 8 random characters
_LOCK_TRIES = 10


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; best effort (some filesystems refuse to open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _csv_text(rows: Iterable[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _written_names(path: Path, flag: str) -> list[tuple[str, Path]]:
    """The files one output option makes: (name, the longest temporary name next to it)."""
    if flag == "--output":
        key = path.with_name(path.name + KEY_SUFFIX)
        return [(path.name, path), (path.name + PARTIAL_SUFFIX, path), (key.name, key)]
    return [(path.name, path)]


def _entry(path: Path) -> str:
    """The directory entry a write replaces: the real folder plus the name (a final symlink is replaced,
    not followed, by every write of this module)."""
    return os.path.join(os.path.realpath(path.parent), path.name)


def check_outputs(outputs: dict[str, Path | None], reads: dict[str, Iterable[Path]]) -> None:
    """Refuse outputs that would replace what the run reads or each other, before anything is written.

    Args:
        outputs: Output paths by option (``{"--output": ..., "--report": ...}``; None: not given).
        reads: What the run reads, by what it is (``{"the bundle": [...], "the input folder": [...]}``).

    Raises:
        UserError: One line naming the option, the path and what it collides with.
    """
    given = {flag: path for flag, path in outputs.items() if path is not None}
    written: dict[str, str] = {}  # directory entry -> the option that writes it
    for flag, path in given.items():
        try:
            limit = os.pathconf(path.parent, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        for name, temp_of in _written_names(path, flag):
            longest = len(os.fsencode(temp_of.name)) + _TEMP_EXTRA
            if len(os.fsencode(name)) > limit or longest > limit:
                room = limit - _TEMP_EXTRA - (len(KEY_SUFFIX) if flag == "--output" else 0)
                raise UserError(
                    f"{flag} {path}: file name too long: crc-infer writes {name} and a temporary file of "
                    f"{longest} bytes next to it, over this file system's limit of {limit}; use a name "
                    f"of at most {room} bytes"
                )
            entry = _entry(path.with_name(name))
            if entry in written and written[entry] != flag:
                raise UserError(
                    f"{flag} {path}: the same file as {written[entry]} (or one of its .partial files); "
                    "pass two different paths"
                )
            written[entry] = flag
        if os.path.isdir(path) or not os.path.isdir(path.parent):
            raise UserError(f"{path}: is a folder or its folder does not exist; pass a file path as {flag}")
    if not any(os.path.lexists(entry) for entry in written):
        return  # what the run reads exists, so outputs that do not exist yet cannot be any of it
    names = {os.path.basename(entry) for entry in written}
    for what, paths in reads.items():
        for path in paths:
            # Only an input spelt with an output's name, or a symlink, can resolve to an output's entry.
            if path.name not in names and not os.path.islink(path):
                continue
            real = os.path.realpath(path)
            if real in written:
                shown = "" if str(path) == real else f" (read as {path})"
                raise UserError(
                    f"{written[real]} {real}: a file of {what}{shown}; crc-infer never writes over what it "
                    f"reads, pass another {written[real]}"
                )


class PredictionWriter:
    """Append prediction rows to ``<path>.partial`` and rename it to ``path`` when the run is complete.

    Args:
        path: The final CSV path; its folder must exist.
        columns: The header row; column 0 is the pair id (the first ``key_columns`` columns, when more).
        resume: Continue from an existing ``<path>.partial`` (its ids end up in :attr:`done_ids`);
            without it any old partial is discarded and the run starts over.
        run_key: What must be equal for rows of two runs to be mixed (bundle, artifact, ...). Stored next
            to the partial; a resume with a different key is refused.
        key_columns: How many leading columns identify a row; its id is their values joined by ``,``
            (whole-slide tiles.csv: x and y, id ``"x,y"``).

    Raises:
        UserError: The partial cannot be created, is a symlink, has another header or run key.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        columns: Sequence[str],
        resume: bool = False,
        run_key: dict | None = None,
        key_columns: int = 1,
    ) -> None:
        self.path = Path(path)
        self.key_columns = key_columns
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.key_path = self.path.with_name(self.path.name + KEY_SUFFIX)
        self.columns = [str(c) for c in columns]
        self.run_key = {"columns": self.columns, **(run_key or {})}
        self.ids: list[str] = []  # every id in the partial, in the order written
        self.done_ids: set[str] = set()
        self.resumed_rows: list[list[str]] = []
        self.dropped_torn = 0
        for p in (self.partial, self.key_path):
            if p.is_symlink() or p.is_dir():
                raise UserError(f"{p}: is a symlink or a folder; remove it (predictions never go there)")
        try:
            self._fh = open(self._open_locked(), "ab", buffering=0)  # noqa: SIM115 (closed in finalize)
        except OSError as exc:
            raise UserError(f"{self.partial}: cannot write predictions ({os_reason(exc)})") from None
        try:
            if resume and os.fstat(self._fh.fileno()).st_size:
                self._load_partial()
            else:
                if resume:
                    log.info("%s: nothing to resume, starting a new run", self.partial)
                self._start()
        except OSError as exc:
            self._fh.close()
            raise UserError(f"{self.partial}: cannot write predictions ({os_reason(exc)})") from None
        except BaseException:
            self._fh.close()
            raise

    def _open_locked(self) -> int:
        """Open (or create) the partial and take an exclusive lock on it; a live run holding it stops us.

        The lock is checked to be on the file that has the partial's name now: a run that finished
        between our open and our lock renamed it to its final name, and we must not write there.
        """
        for _ in range(_LOCK_TRIES):
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(self.partial, flags, 0o644)
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(
                    f"{self.partial}: another crc-infer run is writing its predictions there now; wait for "
                    "it to finish or pass another --output"
                ) from None
            except OSError as exc:  # a file system without locks (some network mounts)
                log.warning("%s: cannot lock it (%s); make sure no other run writes here", self.partial, exc)
                return fd
            opened = os.fstat(fd)
            try:
                now = os.stat(self.partial, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
        raise UserError(f"{self.partial}: keeps being replaced by another process; pass another --output")

    def _start(self) -> None:
        # The partial first: a crash before the new key leaves a header only, which any key may resume.
        fd = self._fh.fileno()
        os.ftruncate(fd, 0)
        self._write(_csv_text([self.columns]).encode("utf-8"))
        atomic_write_text(self.key_path, json.dumps(self.run_key, sort_keys=True) + "\n")

    def _write(self, data: bytes) -> None:
        """Append ``data`` and fsync; on failure cut the partial back to what it held before."""
        fd = self._fh.fileno()
        before = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):  # shrinking works on a full disk
                os.ftruncate(fd, before)
            raise

    def _load_partial(self) -> None:
        redo = "; delete it or run without --resume to start over"
        try:
            key = json.loads(self.key_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            key = None
        if key != json.loads(json.dumps(self.run_key)):
            raise UserError(
                f"{self.partial}: written by another bundle, artifact or class list (or its "
                f"{self.key_path.name} is missing){redo}"
            )
        fd = self._fh.fileno()
        os.lseek(fd, 0, os.SEEK_SET)
        raw = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        lines = [line + b"\n" for line in raw.split(b"\n")[:-1]]  # bytes after the last newline: torn
        consumed = [0]

        def feed():
            for line in lines:
                consumed[0] += len(line)
                yield line.decode("utf-8")

        # The reader pulls one line at a time (more only inside a quoted field), so after each record
        # consumed[0] is the byte offset where that record ends.
        try:
            records = [(record, consumed[0]) for record in csv.reader(feed())]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{self.partial}: not a predictions file ({exc}){redo}") from None
        if not records or records[0][0] != self.columns:
            raise UserError(f"{self.partial}: its header is not this run's columns{redo}")
        rows: list[list[str]] = []
        keep = records[0][1]
        for record, end in records[1:]:
            # A record cut inside a quoted field parses short; it and anything after it are dropped.
            if len(record) != len(self.columns) or not record[0] or self._id(record) in self.done_ids:
                self.dropped_torn = len(records) - 1 - len(rows)
                break
            rows.append(record)
            self.done_ids.add(self._id(record))
            keep = end
        self.ids = [self._id(r) for r in rows]
        self.resumed_rows = rows
        if keep != len(raw):
            log.warning("%s: dropped a torn last row left by the killed run", self.partial)
            os.ftruncate(fd, keep)  # in place: the locked file stays the partial
            os.fsync(fd)
        log.info("%s: resuming after %d rows", self.partial, len(rows))

    def _id(self, row: Sequence[str]) -> str:
        return row[0] if self.key_columns == 1 else ",".join(row[: self.key_columns])

    def write_rows(self, rows: Iterable[Sequence[str]]) -> None:
        """Append rows (column 0 = id) and flush them to disk before returning.

        Raises:
            UserError: The write failed (disk full, file too large, I/O error). The partial is cut back
                to the rows before this batch, so ``--resume`` continues from there (:meth:`abandon`
                says so).
        """
        rows = [[str(v) for v in row] for row in rows]
        if not rows:
            return
        try:
            self._write(_csv_text(rows).encode("utf-8"))
        except OSError as exc:
            reason = os_reason(exc)
            raise UserError(f"{self.partial}: cannot write predictions ({reason}), make room") from None
        for row in rows:
            self.ids.append(self._id(row))
            self.done_ids.add(self._id(row))

    def finalize(self, order: Sequence[str] | None = None) -> Path:
        """Close the partial and atomically give it the final name.

        Args:
            order: Pair ids in input order. Rows are put in this order (a resumed run or a streaming
                pipeline may have written them otherwise); rows whose id is not in it (the input folder
                changed between runs) are dropped with a warning. None keeps the written order.

        Returns:
            The final path.
        """
        try:
            position = {pid: i for i, pid in enumerate(order)} if order is not None else None
            if position is None or self.ids == sorted(
                (i for i in self.ids if i in position), key=position.__getitem__
            ):
                os.replace(self.partial, self.path)  # the partial was fsynced batch by batch
            else:
                with open(self.partial, newline="", encoding="utf-8") as fh:
                    records = list(csv.reader(fh))[1:]
                stale = [r for r in records if self._id(r) not in position]
                if stale:
                    log.warning("%s: %d rows name pairs not in the input; dropped", self.partial, len(stale))
                records = sorted(
                    (r for r in records if self._id(r) in position), key=lambda r: position[self._id(r)]
                )
                atomic_write_text(self.path, _csv_text([self.columns, *records]))
                self.partial.unlink()
            _fsync_dir(self.path.parent)
            with contextlib.suppress(FileNotFoundError):
                self.key_path.unlink()
        finally:
            self._fh.close()  # the lock goes with it, once the partial has its final name
        return self.path

    def discard(self) -> None:
        """Remove the partial and its key (a run that produced nothing), then close."""
        for p in (self.partial, self.key_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._fh.close()

    def abandon(self) -> str | None:
        """After an error: remove the files if they hold no row, else keep them for ``--resume``.

        Returns:
            What was kept, to add to the error line (None: nothing was).
        """
        if self._fh.closed:
            return None
        if not self.ids:
            self.discard()
            return None
        self._fh.close()
        return f"{len(self.ids)} rows kept in {self.partial}; run the same command with --resume to continue"
