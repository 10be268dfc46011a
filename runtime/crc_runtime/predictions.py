"""Crash-safe, resumable predictions CSV: rows go to ``<path>.partial``; the final name appears at the end.

Layout while a run is going (all next to the output path, nowhere else):

- ``<path>.partial``: the header, then one CSV row per processed pair, appended and fsynced per batch.
- ``<path>.partial.json``: the run key (columns, bundle and artifact identity) written once at the start,
  so ``--resume`` refuses to mix rows of two different models.

A killed process therefore leaves only these two files; the final name never holds a half-written file.
On resume the partial rows are read back (a torn last record is dropped), their ids are skipped, and new
rows are appended. :meth:`PredictionWriter.finalize` puts the rows in pair order (the order of the input
listing), so the final file is byte for byte the file an uninterrupted run writes.
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
from .errors import UserError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
KEY_SUFFIX = ".partial.json"


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


class PredictionWriter:
    """Append prediction rows to ``<path>.partial`` and rename it to ``path`` when the run is complete.

    Args:
        path: The final CSV path; its folder must exist.
        columns: The header row; column 0 is the pair id.
        resume: Continue from an existing ``<path>.partial`` (its ids end up in :attr:`done_ids`);
            without it any old partial is discarded and the run starts over.
        run_key: What must be equal for rows of two runs to be mixed (bundle, artifact, ...). Stored next
            to the partial; a resume with a different key is refused.

    Raises:
        UserError: The partial cannot be created, is a symlink, has another header or run key.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        columns: Sequence[str],
        resume: bool = False,
        run_key: dict | None = None,
    ) -> None:
        self.path = Path(path)
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
            if resume and self.partial.exists():
                self._load_partial()
            else:
                if resume:
                    log.info("%s: nothing to resume, starting a new run", self.partial)
                self._start()
            self._fh = open(self.partial, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in finalize)
        except OSError as exc:
            raise UserError(f"{self.partial}: cannot write predictions ({exc.strerror or exc})") from None

    def _start(self) -> None:
        atomic_write_text(self.key_path, json.dumps(self.run_key, sort_keys=True) + "\n")
        atomic_write_text(self.partial, _csv_text([self.columns]))

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
        raw = self.partial.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # bytes after the last newline are a torn write
        try:
            records = list(csv.reader(io.StringIO(complete.decode("utf-8"), newline="")))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise UserError(f"{self.partial}: not a predictions file ({exc}){redo}") from None
        if not records or records[0] != self.columns:
            raise UserError(f"{self.partial}: its header is not this run's columns{redo}")
        rows: list[list[str]] = []
        for record in records[1:]:
            # A record cut inside a quoted field parses short; it and anything after it are dropped.
            if len(record) != len(self.columns) or not record[0] or record[0] in self.done_ids:
                self.dropped_torn = len(records) - 1 - len(rows)
                break
            rows.append(record)
            self.done_ids.add(record[0])
        self.ids = [r[0] for r in rows]
        self.resumed_rows = rows
        if self.dropped_torn or len(complete) != len(raw):
            log.warning("%s: dropped a torn last row left by the killed run", self.partial)
            atomic_write_text(self.partial, _csv_text([self.columns, *rows]))
        log.info("%s: resuming after %d rows", self.partial, len(rows))

    def write_rows(self, rows: Iterable[Sequence[str]]) -> None:
        """Append rows (column 0 = id) and flush them to disk before returning."""
        rows = [[str(v) for v in row] for row in rows]
        if not rows:
            return
        self._fh.write(_csv_text(rows))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        for row in rows:
            self.ids.append(row[0])
            self.done_ids.add(row[0])

    def finalize(self, order: Sequence[str] | None = None) -> Path:
        """Close the partial and atomically give it the final name.

        Args:
            order: Pair ids in input order. Rows are put in this order (a resumed run or a streaming
                pipeline may have written them otherwise); rows whose id is not in it (the input folder
                changed between runs) are dropped with a warning. None keeps the written order.

        Returns:
            The final path.
        """
        self._fh.close()
        position = {pid: i for i, pid in enumerate(order)} if order is not None else None
        if position is None or self.ids == sorted(
            (i for i in self.ids if i in position), key=position.__getitem__
        ):
            os.replace(self.partial, self.path)  # the partial was fsynced batch by batch
        else:
            with open(self.partial, newline="", encoding="utf-8") as fh:
                records = list(csv.reader(fh))[1:]
            stale = [r[0] for r in records if r[0] not in position]
            if stale:
                log.warning("%s: %d rows name pairs not in the input; dropped", self.partial, len(stale))
            records = sorted((r for r in records if r[0] in position), key=lambda r: position[r[0]])
            atomic_write_text(self.path, _csv_text([self.columns, *records]))
            self.partial.unlink()
        _fsync_dir(self.path.parent)
        with contextlib.suppress(FileNotFoundError):
            self.key_path.unlink()
        return self.path

    def discard(self) -> None:
        """Close and remove the partial and its key (a run that produced nothing)."""
        self._fh.close()
        for p in (self.partial, self.key_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
