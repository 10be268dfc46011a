"""Find image pairs in an input folder: ``pairs.csv``, or ``pathology/`` + ``radiology/`` matched by stem."""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PairsError

log = logging.getLogger(__name__)

PAIRS_CSV = "pairs.csv"
MODALITIES = ("pathology", "radiology")
REQUIRED_COLUMNS = ("id", "pathology", "radiology")


@dataclass(frozen=True)
class Pair:
    """One pathology tile and one radiology slice, with an optional label (class name or index)."""

    id: str
    pathology: Path
    radiology: Path
    label: str | None = None


@dataclass(frozen=True)
class Skip:
    """An item left out of the run, and why (one line)."""

    item: str
    reason: str


@dataclass
class PairSet:
    """The pairs found in a folder, the items skipped, and where the pairs came from."""

    pairs: list[Pair] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    source: str = ""


def _inside(folder: Path, rel: str) -> Path | None:
    """``folder / rel`` if it stays inside ``folder`` (after resolving ``..`` and links), else None."""
    root = folder.resolve()
    path = (folder / rel).resolve()
    try:
        path.relative_to(root)
    except ValueError:
        return None
    return path


def _from_csv(folder: Path, csv_path: Path) -> PairSet:
    result = PairSet(source=str(csv_path))
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise PairsError(
                    f"{csv_path}: missing column(s) {', '.join(missing)} "
                    f"(found: {', '.join(columns) or 'none'}); "
                    "expected id,pathology,radiology[,label]"
                )
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as exc:
        raise PairsError(f"{csv_path}: not UTF-8 text ({exc.reason}); save it as UTF-8 CSV") from None
    except csv.Error as exc:
        raise PairsError(f"{csv_path}: not a valid CSV ({exc})") from None
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        item = f"{csv_path.name} line {line}"
        pair_id = row.get("id", "")
        if not pair_id:
            result.skipped.append(Skip(item, "empty id"))
            continue
        if pair_id in seen:
            result.skipped.append(Skip(item, f"duplicate id {pair_id!r}"))
            continue
        paths: dict[str, Path] = {}
        for modality in MODALITIES:
            rel = row.get(modality, "")
            path = _inside(folder, rel) if rel else None
            if not rel:
                reason = f"empty {modality} path"
            elif path is None:
                reason = f"{modality} path {rel!r} escapes {folder}; paths must stay inside the input folder"
            elif not path.is_file():
                reason = f"{modality} file {folder / rel} not found"
            else:
                paths[modality] = folder / rel
                continue
            result.skipped.append(Skip(f"{item} ({pair_id})", reason))
            break
        else:
            seen.add(pair_id)
            result.pairs.append(
                Pair(pair_id, paths["pathology"], paths["radiology"], row.get("label") or None)
            )
    return result


def _by_stem(directory: Path) -> tuple[dict[str, Path], list[Skip]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        found.setdefault(path.stem, []).append(path)
    unique = {stem: paths[0] for stem, paths in found.items() if len(paths) == 1}
    skips = [
        Skip(
            str(paths[0]),
            f"ambiguous: {len(paths)} files share the stem {stem!r} ({', '.join(p.name for p in paths)})",
        )
        for stem, paths in found.items()
        if len(paths) > 1
    ]
    return unique, skips


def _from_folders(folder: Path) -> PairSet:
    result = PairSet(source=f"{folder / 'pathology'} + {folder / 'radiology'}")
    path_files, skips_p = _by_stem(folder / "pathology")
    radio_files, skips_r = _by_stem(folder / "radiology")
    result.skipped += skips_p + skips_r
    for stem in sorted(path_files.keys() | radio_files.keys()):
        if stem not in radio_files:
            result.skipped.append(
                Skip(str(path_files[stem]), f"no radiology partner named {stem}.* in radiology/")
            )
        elif stem not in path_files:
            result.skipped.append(
                Skip(str(radio_files[stem]), f"no pathology partner named {stem}.* in pathology/")
            )
        else:
            result.pairs.append(Pair(stem, path_files[stem], radio_files[stem]))
    return result


def discover_pairs(folder: str | os.PathLike) -> PairSet:
    """Find the pairs in ``folder``.

    ``FOLDER/pairs.csv`` (columns id, pathology, radiology, optional label; paths relative to the
    folder) wins when present; otherwise files in ``FOLDER/pathology/`` and ``FOLDER/radiology/`` are
    paired by file stem. Rows or files that cannot be used are skipped with a reason.

    Raises:
        PairsError: The folder does not exist, has neither layout, or yields no pairs at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PairsError(f"{folder}: not a folder; pass a folder with pairs.csv or pathology/ + radiology/")
    csv_path = folder / PAIRS_CSV
    if csv_path.is_file():
        result = _from_csv(folder, csv_path)
    elif all((folder / m).is_dir() for m in MODALITIES):
        result = _from_folders(folder)
    else:
        raise PairsError(
            f"{folder}: expected {PAIRS_CSV} or both pathology/ and radiology/ subfolders; found neither"
        )
    if not result.pairs:
        first = f" (first: {result.skipped[0].item}: {result.skipped[0].reason})" if result.skipped else ""
        raise PairsError(f"{result.source}: no usable pairs, {len(result.skipped)} skipped{first}")
    log.info("%s: %d pairs, %d skipped", result.source, len(result.pairs), len(result.skipped))
    return result
