"""Find image pairs in an input folder: ``pairs.csv``, or ``pathology/`` + ``radiology/`` matched by stem.

Every row or file that cannot be used becomes a :class:`Skip` with a one-line reason and a short
``kind`` (the summary counts skips by kind); the rest of the folder still runs. No path, whether from
pairs.csv or a symlink, may lead outside the input folder.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .confine import Confined, Refused
from .errors import PairsError, os_reason, printable

log = logging.getLogger(__name__)

PAIRS_CSV = "pairs.csv"
MODALITIES = ("pathology", "radiology")
REQUIRED_COLUMNS = ("id", "pathology", "radiology")
_SURROGATE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8 (decoded with surrogateescape)
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_INDEX = re.compile("[0-9]+")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class Pair:
    """One pathology tile and one radiology slice, with an optional label (class name or index)."""

    id: str
    pathology: Path
    radiology: Path
    label: str | None = None


@dataclass(frozen=True)
class Skip:
    """An item left out of the run, why (one line), and the kind of reason the summary counts."""

    item: str
    reason: str
    kind: str = "other"

    def __post_init__(self) -> None:
        # One line each, whatever ids, file names or resolved paths the item and reason quote.
        object.__setattr__(self, "item", printable(self.item))
        object.__setattr__(self, "reason", printable(self.reason))


@dataclass
class PairSet:
    """The pairs found in a folder, the items skipped, and where the pairs came from.

    ``confined`` is the input folder's confinement: open the pairs' files through it
    (``load_image(..., confined=pairset.confined)``) so that a file swapped for a symlink to an outside
    file after the listing is refused, not read.
    """

    pairs: list[Pair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    source: str = ""
    confined: Confined | None = None
    csv_path: Path | None = None

    def paths(self) -> list[Path]:
        """Every file the run reads: pairs.csv (if any) and each distinct image, in order."""
        seen = dict.fromkeys(p for pair in self.pairs for p in (pair.pathology, pair.radiology))
        return [*([self.csv_path] if self.csv_path else []), *seen]


def _read_rows(csv_path: Path, confined: Confined) -> tuple[list[str], list[tuple[int, list[str]]], bool]:
    """The header (stripped, lower case), (line number, fields) of every non-blank row, and whether
    any byte was not UTF-8."""
    try:
        with open(confined.open(csv_path), "rb") as fh:  # still inside the folder as it is read
            raw = fh.read()
    except Refused as exc:
        raise PairsError(f"{csv_path}: {exc.reason}") from None
    except OSError as exc:
        raise PairsError(f"{csv_path}: cannot read ({os_reason(exc)})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PairsError(f"{csv_path}: UTF-16 text; save it as UTF-8 CSV")
    # Undecodable bytes become lone surrogates, so one bad row is skipped, not the whole file.
    text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    try:
        header = next(reader, [])
        for fields in reader:
            if any(f.strip() for f in fields):  # blank lines and rows of empty fields are ignored
                rows.append((reader.line_num, fields))
    except csv.Error as exc:
        raise PairsError(f"{csv_path} line {reader.line_num}: not a valid CSV ({exc})") from None
    return [printable(h).strip().lower() for h in header], rows, _SURROGATE.search(text) is not None


def label_index(label: str, classes: Sequence[str]) -> int | None:
    """The class a label names: a class name, or a class index written in ASCII digits; None if neither.

    Only ``0-9`` count as digits: ``str.isdigit`` also accepts ``²`` or ``٣``, which are no index.
    """
    if label in classes:
        return list(classes).index(label)
    if _INDEX.fullmatch(label) and int(label) < len(classes):
        return int(label)
    return None


def _label_problem(label: str, classes: Sequence[str]) -> str | None:
    """Why ``label`` names no class (a class name, or a class index written as digits), else None."""
    if label_index(label, classes) is not None:
        return None
    return f"label {label!r} is neither a class name of the bundle nor an index below {len(classes)}"


def _from_csv(
    folder: Path, csv_path: Path, confined: Confined, classes: Sequence[str] | None = None
) -> PairSet:
    result = PairSet(source=str(csv_path), confined=confined, csv_path=csv_path)
    header, rows, undecodable = _read_rows(csv_path, confined)
    shown_header = ", ".join(header) or "none"
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing or len(set(header)) != len(header):
        what = f"missing column(s) {', '.join(missing)}" if missing else "repeated column names"
        raise PairsError(
            f"{csv_path}: {what} (found: {shown_header[:200]!r}); expected id,pathology,radiology[,label]"
        )
    extra = [c for c in header if c not in (*REQUIRED_COLUMNS, "label")]
    if extra:
        log.info("%s: ignoring extra column(s) %s", csv_path, ", ".join(extra))
    columns = [(name, header.index(name)) for name in (*REQUIRED_COLUMNS, "label") if name in header]
    base = str(folder)
    made: dict[str, Path] = {}  # one Path per distinct relative path (radiology slices repeat)
    seen: set[str] = set()
    for line, fields in rows:
        values = {k: (fields[i].strip() if i < len(fields) else "") for k, i in columns}
        pair_id = values["id"]

        def skip(reason: str, kind: str, line: int = line, pair_id: str = pair_id) -> None:
            shown = f" ({printable(pair_id)})" if pair_id else ""
            result.skipped.append(Skip(f"{csv_path.name} line {line}{shown}", reason, kind))

        if undecodable and any(_SURROGATE.search(v) for v in values.values()):
            bad = next(m for v in values.values() if (m := _SURROGATE.search(v)))
            skip(f"not UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x}); save {PAIRS_CSV} as UTF-8", "bad row")
            continue
        if not pair_id:
            skip("empty id", "bad row")
            continue
        if _CONTROL.search(pair_id):
            skip("id contains control characters (a line break, tab, ...)", "bad row")
            continue
        if pair_id in seen:
            skip(f"duplicate id {pair_id!r} (the first row with it is used)", "duplicate id")
            continue
        label = values.get("label") or None
        if label is not None and classes is not None and (why := _label_problem(label, classes)):
            skip(why, "unknown label")
            continue
        for modality in MODALITIES:
            rel = values[modality]
            if not rel:
                problem = (f"empty {modality} path", "bad row")
            elif os.path.isabs(rel):
                problem = (
                    f"{modality} path {rel!r} is absolute; give it relative to {folder}",
                    "outside folder",
                )
            else:
                problem = confined.check(os.path.join(base, rel), f"{modality} file {rel!r}")
            if problem:
                skip(*problem)
                break
        else:
            seen.add(pair_id)
            p_rel, r_rel = values["pathology"], values["radiology"]
            for rel in (p_rel, r_rel):
                if rel not in made:
                    made[rel] = folder / rel
            result.pairs.append(Pair(pair_id, made[p_rel], made[r_rel], label))
    return result


def _scan(directory: Path, confined: Confined) -> tuple[dict[str, Path], dict[str, list[str]], list[Skip]]:
    """Image files of one modality folder by stem, stems by case-folded stem, and what was skipped."""
    found: dict[str, list[Path]] = {}
    skips: list[Skip] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):  # hidden files (.DS_Store, ._x.png) are ignored
            continue
        if _SURROGATE.search(path.name) or _CONTROL.search(path.name):  # unfit as an id in a CSV line
            why = "file name is not valid UTF-8 or contains control characters; rename it"
            skips.append(Skip(printable(str(path)), why, "bad path"))
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            reason = f"not an image file name (expected {', '.join(IMAGE_SUFFIXES)})"
            skips.append(Skip(str(path), reason, "not an image file"))
            continue
        problem = confined.check(str(path), "the entry")
        if problem:
            skips.append(Skip(str(path), problem[0].removeprefix("the entry "), problem[1]))
            continue
        found.setdefault(path.stem.casefold(), []).append(path)
    unique: dict[str, Path] = {}
    by_fold: dict[str, list[str]] = {}
    for paths in found.values():
        if len(paths) == 1:
            unique[paths[0].stem] = paths[0]
            by_fold.setdefault(paths[0].stem.casefold(), []).append(paths[0].stem)
        else:
            names = ", ".join(p.name for p in paths)
            skips.append(
                Skip(
                    str(directory / paths[0].stem),
                    f"ambiguous id: {len(paths)} files differ only in case or extension ({names})",
                    "ambiguous id",
                )
            )
    return unique, by_fold, skips


def _from_folders(folder: Path, confined: Confined) -> PairSet:
    result = PairSet(source=f"{folder / 'pathology'} + {folder / 'radiology'}", confined=confined)
    scans = {m: _scan(folder / m, confined) for m in MODALITIES}
    for modality in MODALITIES:
        result.skipped += scans[modality][2]
    files = {m: scans[m][0] for m in MODALITIES}
    for stem in sorted(files["pathology"].keys() | files["radiology"].keys()):
        if stem in files["pathology"] and stem in files["radiology"]:
            result.pairs.append(Pair(stem, files["pathology"][stem], files["radiology"][stem]))
            continue
        have, lack = MODALITIES if stem in files["pathology"] else MODALITIES[::-1]
        near = [s for s in scans[lack][1].get(stem.casefold(), []) if s != stem]
        refused = [Path(k.item).name for k in scans[lack][2] if Path(k.item).stem == stem]
        if refused:
            reason = f"its {lack} partner {refused[0]} was skipped (see its line)"
        elif near:
            name = files[lack][near[0]].name
            reason = f"no {lack} partner named {stem}.* ({lack}/{name} differs only in case;"
            reason += " ids are case-sensitive)"
        else:
            reason = f"no {lack} partner named {stem}.* in {lack}/"
        result.skipped.append(Skip(str(files[have][stem]), reason, "missing partner"))
    return result


def discover_pairs(folder: str | os.PathLike, classes: Sequence[str] | None = None) -> PairSet:
    """Find the pairs in ``folder``.

    ``FOLDER/pairs.csv`` (columns id, pathology, radiology, optional label; paths relative to the
    folder) wins when present; otherwise image files in ``FOLDER/pathology/`` and ``FOLDER/radiology/``
    are paired by file stem. Rows or files that cannot be used are skipped with a reason.

    Args:
        folder: The input folder; no path may lead outside it.
        classes: The bundle's classes; when given, a pairs.csv label that is neither a class name nor
            a class index skips its row here, with the line number.

    Raises:
        PairsError: The folder does not exist, has neither layout, or yields no pairs at all.
    """
    folder = Path(folder)
    try:
        result = _discover(folder, classes)
    except OSError as exc:  # a folder that cannot be listed or looked into (permissions)
        where = exc.filename if exc.filename is not None else folder
        why = os_reason(exc)
        raise PairsError(f"{where}: cannot read ({why}); check the permissions of the input folder") from None
    if not result.pairs:
        first = f" (first: {result.skipped[0].item}: {result.skipped[0].reason})" if result.skipped else ""
        raise PairsError(f"{result.source}: no usable pairs, {len(result.skipped)} skipped{first}")
    log.info("%s: %d pairs, %d skipped", result.source, len(result.pairs), len(result.skipped))
    return result


def _discover(folder: Path, classes: Sequence[str] | None) -> PairSet:
    if not folder.is_dir():
        raise PairsError(f"{folder}: not a folder; pass a folder with pairs.csv or pathology/ + radiology/")
    csv_path = folder / PAIRS_CSV
    present = [m for m in MODALITIES if (folder / m).is_dir()]
    confined = Confined(folder)
    if csv_path.exists():
        if not confined.inside(os.path.realpath(csv_path)) or not csv_path.is_file():
            raise PairsError(f"{csv_path}: not a regular file inside {folder}; replace it by the CSV itself")
        result = _from_csv(folder, csv_path, confined, classes)
    elif len(present) == 2:
        result = _from_folders(folder, confined)
    elif present:
        lack = MODALITIES[1 - MODALITIES.index(present[0])]
        raise PairsError(
            f"{folder}: found {present[0]}/ but no {lack}/ folder; every pair needs both modalities"
        )
    else:
        raise PairsError(
            f"{folder}: expected {PAIRS_CSV} or both pathology/ and radiology/ subfolders; found neither"
        )
    return result
