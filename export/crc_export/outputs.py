"""Where crc-export may write: the bundle folder and the Triton repository, and what it may replace.

A target folder is new, empty, or (``--overwrite``) one crc-export wrote: a bundle (``bundle_problem``)
or a Triton repository (``triton.repository_problem``). It is never the run dir being exported or a
folder that holds it, never a file, and its nearest existing folder must take a new entry. Anything else
is one ``UserError`` line before any work starts. A full disk mid-export is one line too (``writing``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from crc_runtime.bundle import MANIFEST_NAME, MAX_MANIFEST_BYTES
from crc_runtime.errors import UserError, printable

__all__ = ["bundle_problem", "check_output_folder", "writing"]


def bundle_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a bundle crc-export wrote (None when it is one), read without hashing.

    A bundle has a manifest.json with crc-export's markers (an integer schema_version, ``files`` mapping
    names to sha256 digests, an ``artifacts`` list, ``provenance`` with the run id) and nothing besides
    the files that manifest lists.
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME}"
    try:
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return f"{MANIFEST_NAME} is larger than any manifest crc-export writes"
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return f"{MANIFEST_NAME} is not readable JSON"
    if not isinstance(manifest, dict):
        return f"{MANIFEST_NAME} is not a crc-export manifest"
    files, provenance = manifest.get("files"), manifest.get("provenance")
    marked = (
        isinstance(manifest.get("schema_version"), int)
        and isinstance(files, dict)
        and all(isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in files.items())
        and isinstance(manifest.get("artifacts"), list)
        and isinstance(provenance, dict)
        and "run_id" in provenance
    )
    if not marked:
        return f"{MANIFEST_NAME} is not a crc-export manifest"
    foreign = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST_NAME and p.name not in files)
    if foreign:
        return f"it holds files the bundle does not list ({', '.join(map(printable, foreign[:3]))})"
    return None


def check_output_folder(
    target: Path,
    flag: str,
    run_dir: Path | None,
    overwrite: bool,
    problem: Callable[[Path], str | None],
) -> None:
    """Refuse a target folder crc-export must not write or replace (docstring of this module).

    Args:
        target: the folder to write.
        flag: how the user named it (``-o``, ``--triton``), for the message.
        run_dir: the run being exported: never the target nor inside it (None: no run to protect).
        overwrite: ``--overwrite`` was given.
        problem: ``folder -> str | None``, why an existing folder is not ours to replace.

    Raises:
        UserError: one line naming the folder and what to do.
    """
    if run_dir is not None:
        resolved, run = target.resolve(), run_dir.resolve()
        if resolved == run or resolved in run.parents:
            what = "is the run dir" if resolved == run else f"holds the run dir {run_dir}"
            raise UserError(f"{flag} {target} {what}; write the export to a folder outside the run")
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target} exists and is not a folder; choose another {flag}")
    if target.is_dir():
        try:
            non_empty = any(target.iterdir())
        except OSError as exc:
            raise UserError(f"cannot read {flag} {target}: {exc.strerror or exc}") from None
        if non_empty and not overwrite:
            raise UserError(f"{target}: exists and is not empty; pass --overwrite to replace it")
        why = problem(target) if non_empty else None
        if why:
            raise UserError(
                f"{flag} {target}: --overwrite replaces only what crc-export wrote, and {why}; "
                f"remove it yourself or choose another {flag}"
            )
    _check_writable(target, flag)


def _check_writable(target: Path, flag: str) -> None:
    """The nearest existing folder of ``target`` takes a new entry (a real probe: root ignores modes)."""
    ancestor = target.parent if target.is_dir() else target
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {flag} {target}: {ancestor} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=".crc-export-probe-", dir=ancestor)).rmdir()
    except OSError as exc:
        raise UserError(f"cannot write {flag} {target}: {ancestor}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def writing(target: Path, flag: str) -> Iterator[None]:
    """A full disk or a folder that turned read-only mid-export: one line (nothing half-written stays)."""
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {flag} {target}: {exc.strerror or exc}") from None
