"""Bad-input corpus, pairing and pairs.csv: one line per bad row or file, the rest of the folder runs."""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.cli import cli
from crc_runtime.errors import PairsError
from crc_runtime.pairs import discover_pairs
from PIL import Image

_buf = io.BytesIO()
Image.fromarray(np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(_buf, "PNG")
PNG = _buf.getvalue()
HEADER = "id,pathology,radiology,label\n"


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG)
    return path


def _kinds(found) -> Counter:
    return Counter(s.kind for s in found.skipped)


# ---------------------------------------------------------------- pathology/ + radiology/ folders

FOLDER_CASES = {
    # name: (files to create (relative), pairs expected, skip kinds expected)
    "one pair": (["pathology/a.png", "radiology/a.png"], 1, {}),
    "no radiology partner": (
        ["pathology/a.png", "radiology/a.png", "pathology/b.png"],
        1,
        {"missing partner": 1},
    ),
    "no pathology partner": (
        ["pathology/a.png", "radiology/a.png", "radiology/b.jpg"],
        1,
        {"missing partner": 1},
    ),
    "same id, two extensions": (
        ["pathology/a.png", "radiology/a.png", "pathology/b.png", "pathology/b.jpg", "radiology/b.png"],
        1,
        {"ambiguous id": 1, "missing partner": 1},
    ),
    "ids differ only in case, one folder": (
        ["pathology/a.png", "radiology/a.png", "pathology/B.png", "pathology/b.png", "radiology/b.png"],
        1,
        {"ambiguous id": 1, "missing partner": 1},
    ),
    "ids differ only in case across folders": (
        ["pathology/a.png", "radiology/a.png", "pathology/C.png", "radiology/c.png"],
        1,
        {"missing partner": 2},
    ),
    "extension case is free": (["pathology/a.PNG", "radiology/a.jpeg"], 1, {}),
    "non-image file": (
        ["pathology/a.png", "radiology/a.png", "pathology/notes.txt"],
        1,
        {"not an image file": 1},
    ),
    "hidden files ignored": (
        ["pathology/a.png", "radiology/a.png", "pathology/.DS_Store", "radiology/._a.png"],
        1,
        {},
    ),
    "folder named like an image": (
        ["pathology/a.png", "radiology/a.png", "pathology/x.png/", "radiology/x.png"],
        1,
        {"not a file": 1, "missing partner": 1},
    ),
    "subfolder": (["pathology/a.png", "radiology/a.png", "radiology/more/"], 1, {"not an image file": 1}),
}


def _build(root: Path, files: list[str]) -> Path:
    for name in ("pathology", "radiology"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for rel in files:
        if rel.endswith("/"):
            (root / rel).mkdir(parents=True)
        else:
            _img(root / rel)
    return root


@pytest.mark.parametrize("name", FOLDER_CASES)
def test_folder_layout(tmp_path, name):
    files, pairs, kinds = FOLDER_CASES[name]
    found = discover_pairs(_build(tmp_path / "in", files))
    assert len(found.pairs) == pairs and _kinds(found) == Counter(kinds)
    for skip in found.skipped:
        assert "\n" not in skip.reason and str(tmp_path) in skip.item


def test_case_hint_and_refused_partner(tmp_path):
    found = discover_pairs(
        _build(
            tmp_path,
            [
                "pathology/a.png",
                "radiology/a.png",
                "pathology/C.png",
                "radiology/c.png",
                "pathology/x.png/",
                "radiology/x.png",
            ],
        )
    )
    reasons = {Path(s.item).name: s.reason for s in found.skipped}
    assert "radiology/c.png differs only in case" in reasons["C.png"]
    assert "is a folder" in reasons["x.png"] or "partner x.png was skipped" in reasons["x.png"]


def test_symlinks(tmp_path):
    outside = _img(tmp_path / "outside" / "secret.png")
    root = _build(tmp_path / "in", ["pathology/a.png", "radiology/a.png", "shared/b.png", "radiology/b.png"])
    (root / "pathology" / "b.png").symlink_to(root / "shared" / "b.png")  # inside: fine
    (root / "pathology" / "c.png").symlink_to(outside)  # outside: refused
    (root / "radiology" / "c.png").write_bytes(PNG)
    (root / "pathology" / "d.png").symlink_to(root / "nowhere.png")  # broken
    (root / "radiology" / "d.png").write_bytes(PNG)
    found = discover_pairs(root)
    assert [p.id for p in found.pairs] == ["a", "b"]
    assert _kinds(found) == Counter({"outside folder": 1, "missing file": 1, "missing partner": 2})
    line = next(s for s in found.skipped if s.kind == "outside folder")
    assert line.item.endswith("pathology/c.png") and str(outside) in line.reason


def test_modality_folder_that_is_a_symlink_outside(tmp_path):
    _img(tmp_path / "elsewhere" / "a.png")
    root = tmp_path / "in"
    _img(root / "radiology" / "a.png")
    (root / "pathology").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PairsError, match="no usable pairs"):
        discover_pairs(root)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ([], "found neither"),
        (["pathology/"], "found pathology/ but no radiology/"),
        (["radiology/a.png"], "found radiology/ but no pathology/"),
        (["pathology/", "radiology/"], "no usable pairs, 0 skipped"),
        (["pathology/a.png", "radiology/b.png"], "no usable pairs, 2 skipped"),
    ],
)
def test_folders_with_nothing_to_do(tmp_path, layout, message):
    root = tmp_path / "in"
    root.mkdir()
    for rel in layout:
        (root / rel).mkdir(parents=True) if rel.endswith("/") else _img(root / rel)
    with pytest.raises(PairsError, match=message):
        discover_pairs(root)


@pytest.mark.parametrize("target", ["missing", "file"])
def test_not_a_folder(tmp_path, target):
    path = tmp_path / "x"
    if target == "file":
        path.write_text("x")
    with pytest.raises(PairsError, match="not a folder"):
        discover_pairs(path)


# ---------------------------------------------------------------- pairs.csv

GOOD = "g,img/p.png,img/r.png,adipose\n"
CSV_CASES = {
    # name: (csv bytes, pairs expected, skip kinds expected)
    "plain": ((HEADER + GOOD).encode(), 1, {}),
    "BOM": (b"\xef\xbb\xbf" + (HEADER + GOOD).encode(), 1, {}),
    "CRLF": ((HEADER + GOOD).replace("\n", "\r\n").encode(), 1, {}),
    "header case and spaces": ((" ID , Pathology,RADIOLOGY \n" + "g,img/p.png,img/r.png\n").encode(), 1, {}),
    "no label column": (b"id,pathology,radiology\ng,img/p.png,img/r.png\n", 1, {}),
    "extra columns": (b"site,id,pathology,radiology,label,notes\nA,g,img/p.png,img/r.png,,x\n", 1, {}),
    "blank lines and empty rows": ((HEADER + "\n\n" + GOOD + ",,,\n \n").encode(), 1, {}),
    "quoted commas": ((HEADER + GOOD + '"h,1","img/p,q.png",img/r.png,\n').encode(), 2, {}),
    "non-UTF-8 row": ((HEADER + GOOD).encode() + b"caf\xe9,img/p.png,img/r.png,\n", 1, {"bad row": 1}),
    "duplicate id": ((HEADER + GOOD + GOOD).encode(), 1, {"duplicate id": 1}),
    "ids differing in case": ((HEADER + GOOD + GOOD.replace("g,", "G,", 1)).encode(), 2, {}),
    "empty id": ((HEADER + GOOD + ",img/p.png,img/r.png,\n").encode(), 1, {"bad row": 1}),
    "short row": ((HEADER + GOOD + "s,img/p.png\n").encode(), 1, {"bad row": 1}),
    "dot-dot escape": ((HEADER + GOOD + "e,../outside.png,img/r.png,\n").encode(), 1, {"outside folder": 1}),
    "nested dot-dot escape": (
        (HEADER + GOOD + "e,img/../../outside.png,img/r.png,\n").encode(),
        1,
        {"outside folder": 1},
    ),
    "dot-dot that stays inside": ((HEADER + GOOD + "e,img/../img/p.png,img/r.png,\n").encode(), 2, {}),
    "absolute path outside": (
        (HEADER + GOOD + "e,/etc/passwd,img/r.png,\n").encode(),
        1,
        {"outside folder": 1},
    ),
    "symlink to outside": (
        (HEADER + GOOD + "e,img/link.png,img/r.png,\n").encode(),
        1,
        {"outside folder": 1},
    ),
    "missing file": ((HEADER + GOOD + "m,img/nope.png,img/r.png,\n").encode(), 1, {"missing file": 1}),
    "path is a folder": ((HEADER + GOOD + "d,img,img/r.png,\n").encode(), 1, {"not a file": 1}),
    "NUL byte in a path": ((HEADER + GOOD + "n,img/p\0.png,img/r.png,\n").encode(), 1, {"bad path": 1}),
    "name too long": ((HEADER + GOOD + f"n,img/{'x' * 300}.png,img/r.png,\n").encode(), 1, {"bad path": 1}),
    "unknown label (checked at run time)": (
        (HEADER + GOOD + "u,img/p.png,img/r.png,tumour\n").encode(),
        2,
        {},
    ),
    # The quote runs to the end of the file: the rest is one pathology path, which does not exist.
    "unterminated quote": ((HEADER + GOOD + 'q,"img/p.png,img/r.png\n').encode(), 1, {"missing file": 1}),
}


@pytest.fixture
def csv_folder(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for name in ("p.png", "r.png", "p,q.png"):
        _img(root / "img" / name)
    _img(tmp_path / "outside.png")
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    return root


@pytest.mark.parametrize("name", CSV_CASES)
def test_pairs_csv(csv_folder, name):
    data, pairs, kinds = CSV_CASES[name]
    (csv_folder / "pairs.csv").write_bytes(data)
    found = discover_pairs(csv_folder)
    assert len(found.pairs) == pairs, found.skipped
    assert _kinds(found) == Counter(kinds)
    for pair in found.pairs:
        assert pair.pathology.is_file() and pair.radiology.is_file()
    for skip in found.skipped:
        assert skip.item.startswith("pairs.csv line ") and "\n" not in skip.reason


def test_absolute_path_inside_is_refused_too(csv_folder):
    (csv_folder / "pairs.csv").write_text(HEADER + GOOD + f"a,{csv_folder}/img/p.png,img/r.png,\n")
    found = discover_pairs(csv_folder)
    assert _kinds(found) == Counter({"outside folder": 1}) and "is absolute" in found.skipped[0].reason


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "missing column"),
        (b"pathology,radiology\na,b\n", "missing column.* id"),
        (b"id,radiology\na,b\n", "missing column.* pathology"),
        (b"id,pathology\na,b\n", "missing column.* radiology"),
        (b"id;pathology;radiology\ng;img/p.png;img/r.png\n", "missing column"),  # semicolons
        (b"id,id,pathology,radiology\n", "repeated column"),
        (HEADER.encode(), "no usable pairs, 0 skipped"),
        (b"\xff\xfei\x00d\x00", "UTF-16"),
        (b"\xe9d,pathology,radiology\n", "missing column"),  # non-UTF-8 header
        ((HEADER + "m,img/nope.png,img/r.png,\n").encode(), "no usable pairs, 1 skipped"),
        ((HEADER + f"big,{'x' * 200_000},img/r.png,\n").encode(), "line 2: not a valid CSV"),
    ],
)
def test_pairs_csv_with_nothing_to_do(csv_folder, data, message):
    (csv_folder / "pairs.csv").write_bytes(data)
    with pytest.raises(PairsError, match=message) as info:
        discover_pairs(csv_folder)
    assert "\n" not in str(info.value) and "pairs.csv" in str(info.value)


def test_pairs_csv_that_is_not_a_file_inside(csv_folder, tmp_path):
    (tmp_path / "other.csv").write_text(HEADER + GOOD)
    (csv_folder / "pairs.csv").symlink_to(tmp_path / "other.csv")
    with pytest.raises(PairsError, match="not a regular file inside"):
        discover_pairs(csv_folder)
    (csv_folder / "pairs.csv").unlink()
    (csv_folder / "pairs.csv").mkdir()
    with pytest.raises(PairsError, match="not a regular file inside"):
        discover_pairs(csv_folder)


def test_hundred_thousand_rows(csv_folder):
    with open(csv_folder / "pairs.csv", "w") as fh:
        fh.write(HEADER)
        fh.writelines(f"id{i},img/p.png,img/r.png,{i % 9}\n" for i in range(100_000))
        fh.write("bad,../x.png,img/r.png,\n")
    found = discover_pairs(csv_folder)
    assert len(found.pairs) == 100_000 and found.pairs[-1].id == "id99999" and found.pairs[0].label == "0"
    assert _kinds(found) == Counter({"outside folder": 1})
    assert found.skipped[0].item == "pairs.csv line 100002 (bad)"


def test_end_to_end_csv_corpus(tiny, tmp_path):
    """Every pairs.csv oddity in one file through crc-infer: exit 3, one line each, valid rows predicted."""
    root = tmp_path / "in"
    for name in ("p.png", "r.png", "p,q.png"):
        _img(root / "img" / name)
    _img(tmp_path / "outside.png")
    (root / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    rows = [
        "g1,img/p.png,img/r.png,adipose",
        "g2,img/p.png,img/r.png,3",
        '"g,3","img/p,q.png",img/r.png,',
        "g1,img/p.png,img/r.png,",  # duplicate
        "u,img/p.png,img/r.png,tumour",  # unknown label
        "e,../outside.png,img/r.png,",
        "a,/etc/passwd,img/r.png,",
        "l,img/link.png,img/r.png,",
        "m,img/nope.png,img/r.png,",
        ",img/p.png,img/r.png,",
        "",
    ]
    (root / "pairs.csv").write_bytes(
        ("\ufeff" + HEADER + "\n".join(rows) + "\n").encode() + b"x\xff,img/p.png,img/r.png,\n"
    )
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(cli, [str(root), "--bundle", str(tiny.bundle), "--output", str(out)])
    assert result.exit_code == 3, result.output
    assert "pairs: 3 processed, 8 skipped" in result.output
    for part in (
        "line 5 (g1): duplicate id",
        "line 6 (u): label 'tumour' is neither",
        "line 7 (e): pathology file '../outside.png' escapes",
        "line 8 (a): pathology path '/etc/passwd' is absolute",
        "line 9 (l): pathology file 'img/link.png' escapes",
        "line 10 (m): pathology file 'img/nope.png' not found",
        "line 11: empty id",
        "line 13 (x\\xff): not UTF-8 (byte 0xff)",
    ):
        assert part in result.output, part
    summary = next(line for line in result.output.splitlines() if line.startswith("skipped by reason: "))
    for part in ("outside folder 3", "duplicate id 1", "unknown label 1", "missing file 1", "bad row 2"):
        assert part in summary
    with open(out, newline="") as fh:
        assert [r[0] for r in csv.reader(fh)] == ["id", "g1", "g2", "g,3"]
    assert not any(p.name.startswith(".") or p.suffix == ".partial" for p in tmp_path.iterdir())
    assert sorted(os.listdir(root)) == ["img", "pairs.csv"]  # nothing written into the input folder


def test_file_names_that_are_not_utf8(tiny, tmp_path):
    root = _build(tmp_path / "in", ["pathology/a.png", "radiology/a.png"])
    for modality in ("pathology", "radiology"):
        (root / modality / os.fsdecode(b"caf\xe9.png")).write_bytes(PNG)
    found = discover_pairs(root)
    assert [p.id for p in found.pairs] == ["a"] and _kinds(found) == Counter({"bad path": 2})
    result = CliRunner().invoke(
        cli, [str(root), "--bundle", str(tiny.bundle), "--output", str(tmp_path / "o.csv")]
    )
    assert result.exit_code == 3, result.output
    assert "pathology/caf\\xe9.png: file name is not valid UTF-8" in result.output


# ---------------------------------------------------------------- read-time confinement (TOCTOU)


def _swap_for_symlink(path: Path, target: Path) -> None:
    """What a hostile process does between the listing and the read: the file becomes a symlink."""
    path.unlink() if not path.is_dir() or path.is_symlink() else shutil.rmtree(path)
    path.symlink_to(target)


@pytest.fixture
def swap_tree(tmp_path: Path) -> tuple[Path, Path]:
    """An input folder with files and a subfolder, and an outside folder holding a valid image."""
    root = _build(tmp_path / "in", ["pathology/a.png", "radiology/a.png", "img/sub/b.png", "img/c.png"])
    _img(tmp_path / "outside" / "secret.png")
    return root, tmp_path / "outside"


# name: (swap(root, outside), path opened (relative to root), refusal kind or None when it opens)
SWAP_CASES = {
    "plain file": (lambda r, o: None, "img/c.png", None),
    "file -> symlink outside (absolute)": (
        lambda r, o: _swap_for_symlink(r / "img/c.png", o / "secret.png"),
        "img/c.png",
        "outside folder",
    ),
    "file -> symlink outside (relative ..)": (
        lambda r, o: _swap_for_symlink(r / "img/c.png", Path("../../outside/secret.png")),
        "img/c.png",
        "outside folder",
    ),
    "folder on the way -> symlink outside": (
        lambda r, o: _swap_for_symlink(r / "img/sub", o),
        "img/sub/secret.png",
        "outside folder",
    ),
    "file -> symlink inside (absolute)": (
        lambda r, o: _swap_for_symlink(r / "img/c.png", r / "img/sub/b.png"),
        "img/c.png",
        None,
    ),
    "file -> symlink inside (relative)": (
        lambda r, o: _swap_for_symlink(r / "img/c.png", Path("sub/b.png")),
        "img/c.png",
        None,
    ),
    "symlink chain that ends outside": (
        lambda r, o: (
            _swap_for_symlink(r / "img/c.png", Path("sub/hop.png")),
            (r / "img/sub/hop.png").symlink_to(o / "secret.png"),
        ),
        "img/c.png",
        "outside folder",
    ),
    "path with .. that stays inside": (lambda r, o: None, "img/sub/../c.png", None),
    "symlink loop": (
        lambda r, o: (
            _swap_for_symlink(r / "img/c.png", Path("d.png")),
            (r / "img/d.png").symlink_to("c.png"),
        ),
        "img/c.png",
        "unreadable",
    ),
    "file -> folder": (
        lambda r, o: ((r / "img/c.png").unlink(), (r / "img/c.png").mkdir()),
        "img/c.png",
        "not a file",
    ),
    "file -> FIFO": (
        lambda r, o: ((r / "img/c.png").unlink(), os.mkfifo(r / "img/c.png")),
        "img/c.png",
        "not a file",
    ),
    "file removed": (lambda r, o: (r / "img/c.png").unlink(), "img/c.png", "missing file"),
}


@pytest.mark.parametrize("name", SWAP_CASES)
def test_read_time_confinement(swap_tree, name):
    """The file is checked as it is opened: a swap after the listing cannot lead the read outside."""
    from crc_runtime.confine import Confined
    from crc_runtime.errors import ImageError
    from crc_runtime.images import load_image

    root, outside = swap_tree
    swap, rel, kind = SWAP_CASES[name]
    confined = Confined(root)
    swap(root, outside)
    if kind is None:
        assert load_image(root / rel, "RGB", 8, confined=confined).shape == (8, 8, 3)
        return
    with pytest.raises(ImageError) as info:
        load_image(root / rel, "RGB", 8, confined=confined)
    assert info.value.kind == kind and str(info.value).startswith(f"{root / rel}: "), str(info.value)
    assert "\n" not in str(info.value)


def test_file_swapped_for_an_outside_symlink_after_listing_is_not_read(tiny, tmp_path, monkeypatch):
    """crc-infer end to end: the folder is listed, then a listed file becomes a symlink to an outside
    image before the decode threads reach it; that pair is refused as outside folder, the rest run."""
    import crc_runtime.pairs as pairs_module

    root = _build(tmp_path / "in", [f"{m}/{i}.png" for m in ("pathology", "radiology") for i in "abc"])
    secret = _img(tmp_path / "secret.png")
    real = pairs_module.discover_pairs

    def list_then_swap(folder, classes=None):
        found = real(folder, classes)
        _swap_for_symlink(root / "pathology" / "b.png", secret)
        return found

    monkeypatch.setattr(pairs_module, "discover_pairs", list_then_swap)
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(cli, [str(root), "--bundle", str(tiny.bundle), "--output", str(out)])
    assert result.exit_code == 3, result.output
    assert "pairs: 2 processed, 1 skipped" in result.output
    assert (
        f"skipped b: {root}/pathology/b.png: escapes the input folder (a symlink to {secret})"
        in result.output
    )
    assert "skipped by reason: outside folder 1" in result.output


def test_pairs_csv_swapped_for_an_outside_symlink_is_not_read(tmp_path, monkeypatch):
    import crc_runtime.pairs as pairs_module

    root = tmp_path / "in"
    _img(root / "img" / "p.png")
    (root / "pairs.csv").write_text(HEADER + "g,img/p.png,img/p.png,\n")
    (tmp_path / "other.csv").write_text(HEADER + "evil,img/p.png,img/p.png,\n")
    real = pairs_module._read_rows

    def swap_then_read(csv_path, confined):
        _swap_for_symlink(csv_path, tmp_path / "other.csv")
        return real(csv_path, confined)

    monkeypatch.setattr(pairs_module, "_read_rows", swap_then_read)
    with pytest.raises(PairsError, match="escapes the input folder"):
        discover_pairs(root)


# ---------------------------------------------------------------- labels and permissions

NINE = [f"class{i}" for i in range(9)]


@pytest.mark.parametrize("label", ["²", "٣", "¹⁰", "1.0", "-1", "9", "1e3", "0x1", "three"])
def test_labels_that_name_no_class(csv_folder, label):
    """A class index is written in ASCII digits: ``²`` and ``٣`` are digits to str.isdigit, not indexes."""
    (csv_folder / "pairs.csv").write_text(
        HEADER + GOOD.replace("adipose", "3") + f"x,img/p.png,img/r.png,{label}\n"
    )
    found = discover_pairs(csv_folder, classes=NINE)
    assert [p.id for p in found.pairs] == ["g"] and _kinds(found) == Counter({"unknown label": 1})
    assert f"label {label!r} is neither a class name" in found.skipped[0].reason


@pytest.mark.parametrize(("label", "index"), [("0", 0), ("8", 8), ("08", 8), ("class4", 4)])
def test_labels_that_name_a_class(label, index):
    from crc_runtime.predict import resolve_label

    assert resolve_label(label, NINE) == index


def test_label_superscript_two_end_to_end(tiny, csv_copy):
    with open(csv_copy / "pairs.csv", "a") as fh:
        fh.write("sq,img/pathology/case-0.png,img/radiology/case-0.png,²\n")
    result = CliRunner().invoke(cli, [str(csv_copy), "--bundle", str(tiny.bundle)])
    assert result.exit_code == 3, result.output
    assert "line 8 (sq): label '²' is neither a class name" in result.output


@pytest.mark.parametrize("locked", ["pathology", "radiology", "the folder", "pairs.csv"])
def test_unreadable_input_folder(as_nobody, open_dir, locked):
    """Root reads everything, so the listing runs as user nobody: one line, no PermissionError."""
    root = _build(open_dir / "in", ["pathology/a.png", "radiology/a.png"])
    if locked == "pairs.csv":
        (root / "pairs.csv").write_text(HEADER + "a,pathology/a.png,radiology/a.png,\n")
    for path in (open_dir, *open_dir.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    target = root if locked == "the folder" else root / locked
    target.chmod(0o000)
    with as_nobody(), pytest.raises(PairsError) as info:
        discover_pairs(root)
    message = str(info.value)
    assert "permission denied" in message and "\n" not in message, message
    assert message.startswith(str(target if locked != "the folder" else root)), message
