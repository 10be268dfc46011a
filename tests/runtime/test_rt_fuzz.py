"""Bounded fuzzing: arbitrary bytes, rows, manifests and reference sets never raise anything but our
one-line user error.

Fixed example budgets and ``derandomize=True``: the same examples every run, so CI time is bounded.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from crc_runtime.errors import ImageError, PairsError, UserError
from crc_runtime.images import load_image
from crc_runtime.pairs import discover_pairs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

FUZZ = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
S = 8


@pytest.fixture(scope="module")
def workdir():
    """One folder per module, outside pytest's tmp tree so symlinks to its parent are meaningful."""
    root = Path(tempfile.mkdtemp(prefix="crc-fuzz-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _one_line(exc: UserError) -> None:
    assert "\n" not in str(exc) and str(exc).strip(), repr(exc)


# ---------------------------------------------------------------- pairs.csv


@pytest.fixture(scope="module")
def csv_folder(workdir: Path) -> Path:
    folder = workdir / "csv"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (S, S), (9, 99, 199)).save(folder / "img" / "a.png")
    (folder / "img" / "b.png").write_bytes((folder / "img" / "a.png").read_bytes())
    (workdir / "secret.png").write_bytes((folder / "img" / "a.png").read_bytes())
    (folder / "img" / "link.png").symlink_to(workdir / "secret.png")
    return folder


def _discover_checked(folder: Path) -> None:
    try:
        found = discover_pairs(folder, classes=["x", "y"])
    except PairsError as exc:
        _one_line(exc)
        return
    root = os.path.realpath(folder)
    for pair in found.pairs:  # whatever the CSV says, every path stays inside the folder
        for path in (pair.pathology, pair.radiology):
            assert os.path.realpath(path).startswith(root + os.sep), path
    for skip in found.skipped:
        assert "\n" not in skip.item + skip.reason and "\r" not in skip.item + skip.reason


@FUZZ
@given(data=st.binary(max_size=400))
def test_pairs_csv_arbitrary_bytes(csv_folder, data):
    (csv_folder / "pairs.csv").write_bytes(data)
    _discover_checked(csv_folder)


_PATHS = st.sampled_from(
    ["img/a.png", "img/b.png", "img/link.png", "../secret.png", "/etc/passwd", "img", "img/../img/a.png", ""]
)
_FIELD = st.one_of(
    _PATHS,
    st.text(max_size=12),
    st.sampled_from(["x", "y", "0", "1", "7", "-1", "  x  ", "a\nb", "../x\r\ny", "\x00", "caf\udcff"]),
)


@FUZZ
@given(
    header=st.lists(
        st.sampled_from(["id", "pathology", "radiology", "label", "ID", "", "extra"]), max_size=6
    ),
    rows=st.lists(st.lists(_FIELD, max_size=6), max_size=8),
    bom=st.booleans(),
)
def test_pairs_csv_arbitrary_rows(csv_folder, header, rows, bom):
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    text = ("\ufeff" if bom else "") + buf.getvalue()
    (csv_folder / "pairs.csv").write_bytes(text.encode("utf-8", "surrogateescape"))  # \udcff -> byte 0xff
    _discover_checked(csv_folder)


_NAME = st.text(
    alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=12,
).filter(lambda n: n not in (".", ".."))


@FUZZ
@given(names=st.lists(st.tuples(st.sampled_from(["pathology", "radiology"]), _NAME), max_size=6))
def test_folder_layout_arbitrary_names(workdir, names):
    folder = workdir / "folders"
    shutil.rmtree(folder, ignore_errors=True)
    for modality in ("pathology", "radiology"):
        (folder / modality).mkdir(parents=True)
    for modality, name in names:
        try:
            (folder / modality / name).write_bytes(b"\x89PNG not really")
        except OSError:  # a name the file system refuses (too long in bytes, ...)
            continue
    _discover_checked(folder)


# ---------------------------------------------------------------- images


def _encoded(fmt: str) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


VALID = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "TIFF", "BMP", "GIF", "WEBP")}


def _load_checked(path: Path, mode: str) -> None:
    try:
        out = load_image(path, mode, S)
    except ImageError as exc:
        _one_line(exc)
        assert str(exc).startswith(f"{path}: ")
        return
    assert out.dtype == np.uint8 and out.shape == (S, S, 3 if mode == "RGB" else 1)


@FUZZ
@given(data=st.binary(max_size=300), ext=st.sampled_from(["png", "jpg", "tif", "gif", "bmp"]))
def test_image_arbitrary_bytes(workdir, data, ext):
    path = workdir / f"fuzz.{ext}"
    path.write_bytes(data)
    _load_checked(path, "RGB")


@FUZZ
@given(
    fmt=st.sampled_from(sorted(VALID)),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    mode=st.sampled_from(["RGB", "L"]),
)
def test_image_damaged_valid_files(workdir, fmt, edits, cut, mode):
    """Real images with bytes overwritten and the tail cut: decoded intact or refused in one line."""
    data = bytearray(VALID[fmt])
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    path = workdir / f"damaged.{fmt.lower()}"
    path.write_bytes(bytes(data))
    _load_checked(path, mode)


# ---------------------------------------------------------------- manifests and reference.npz


@pytest.fixture(scope="module")
def fuzz_bundle(workdir: Path, tiny) -> Path:
    folder = workdir / "bundle"
    shutil.copytree(tiny.bundle, folder)
    return folder


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(
        ["batch", "Pillow", "BILINEAR", "onnx", "fp32", "model.onnx", "logits", "uint8", "RGB"]
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value, prefix=()) -> list[tuple]:
    """Every place in a JSON tree: the keys / indexes leading to it."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            found += _paths(child, (*prefix, i))
    return found


def _exercise(bundle_dir: Path) -> None:
    """Load the bundle and use it as run and validate do: only one-line BundleErrors may come out."""
    from crc_runtime.backends.base import TensorSpec
    from crc_runtime.bundle import load_bundle
    from crc_runtime.predict import input_plan

    model_in = [
        TensorSpec("pathology", "uint8", (None, S, S, 3)),
        TensorSpec("radiology", "uint8", (None, S, S, 1)),
    ]
    model_out = [TensorSpec("logits", "float32", (None, 9))]
    try:
        bundle = load_bundle(bundle_dir)
        bundle.usable_artifacts()
        bundle.check_model(model_in, model_out, bundle_dir)
        input_plan(bundle)
        bundle.load_reference()
        bundle.artifact("fp32")
    except UserError as exc:
        _one_line(exc)


@FUZZ
@given(data=st.data())
def test_manifest_fields_replaced_by_random_json(fuzz_bundle, tiny, data):
    """Any field (or the whole manifest) replaced by any JSON value, or deleted: one line, no traceback."""
    manifest = json.loads((tiny.bundle / "manifest.json").read_text())
    where = data.draw(st.sampled_from(_paths(manifest)))
    if not where:
        manifest = data.draw(_JSON)
    else:
        parent = manifest
        for key in where[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(_JSON)
    (fuzz_bundle / "manifest.json").write_text(json.dumps(manifest))
    _exercise(fuzz_bundle)


@FUZZ
@given(data=st.binary(max_size=600))
def test_manifest_arbitrary_bytes(fuzz_bundle, data):
    (fuzz_bundle / "manifest.json").write_bytes(data)
    _exercise(fuzz_bundle)


_ARRAY = st.tuples(
    st.sampled_from(["uint8", "int64", "float32", "float64", "bool", "int8", "complex64"]),
    st.lists(st.integers(0, 4), max_size=4),
)


def _reference_checked(bundle, path: Path, content: bytes) -> None:
    path.write_bytes(content)
    try:
        ref = bundle.load_reference()
    except UserError as exc:
        _one_line(exc)
        assert str(exc).startswith(str(path)), str(exc)
        return
    n = len(ref["labels"])  # accepted: everything the validate loop indexes lines up
    assert n >= 1 and ref["logits"].shape == (n, len(bundle.classes)) and np.isfinite(ref["logits"]).all()


@FUZZ
@given(
    arrays=st.dictionaries(
        st.sampled_from(["pathology", "radiology", "labels", "logits", "extra"]), _ARRAY, max_size=5
    ),
    fill=st.sampled_from([0, 1, 8, -1, float("nan")]),
)
def test_reference_random_arrays(tiny, workdir, arrays, fill):
    from crc_runtime.bundle import load_bundle

    bundle = load_bundle(tiny.bundle)  # verified once; load_reference reads the file as it is now
    folder = workdir / "ref"
    folder.mkdir(exist_ok=True)
    bundle.path = folder
    buf = io.BytesIO()
    built = {}
    for key, (dtype, shape) in arrays.items():
        value = fill if np.dtype(dtype).kind in "fc" or not isinstance(fill, float) else 0
        built[key] = np.full(shape, value).astype(dtype)
    np.savez(buf, **built)
    _reference_checked(bundle, folder / "reference.npz", buf.getvalue())


@FUZZ
@given(
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_reference_damaged_bytes(tiny, workdir, edits, cut):
    """The real reference.npz (stored, not compressed) with bytes overwritten and the tail cut."""
    from crc_runtime.bundle import load_bundle

    bundle = load_bundle(tiny.bundle)
    folder = workdir / "ref"
    folder.mkdir(exist_ok=True)
    bundle.path = folder
    data = bytearray((tiny.bundle / "reference.npz").read_bytes())
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    _reference_checked(bundle, folder / "reference.npz", bytes(data))
