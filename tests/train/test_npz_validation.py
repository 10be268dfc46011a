"""Every npz file is checked on load: one `error:` line naming the file and the key, never a traceback.

Issue 12, item 9: float 0..1 images, uint16 images, 32-px images in a --size 28 run and 64 images with 10
labels used to train silently; labels out of range, missing keys, object arrays, gray pathology and RGB
radiology gave tracebacks.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from crc_train.data import DataConfig, DataError, load_split, read_npz_split

N = 60  # training samples per modality in the synthetic_root fixture


def _edit(root: Path, flag: str, **changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """The fixture's arrays of ``flag`` with ``changes`` applied (None removes a key)."""
    with np.load(root / f"{flag}.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


def _pathology(root: Path) -> np.ndarray:
    with np.load(root / "pathmnist.npz") as npz:
        return npz["train_images"]


# (file whose train split is changed, changes, words the one-line error must hold)
CASES = {
    "float images 0..1": (
        "pathmnist",
        lambda r: {"train_images": _pathology(r).astype(np.float32) / 255},
        ["train_images", "float32", "uint8"],
    ),
    "uint16 images": (
        "pathmnist",
        lambda r: {"train_images": _pathology(r).astype(np.uint16) * 257},
        ["train_images", "uint16", "uint8"],
    ),
    "32-px images in a --size 28 run": (
        "pathmnist",
        lambda r: {"train_images": np.zeros((N, 32, 32, 3), np.uint8)},
        ["train_images", "(60, 32, 32, 3)", "--size 28"],
    ),
    "more images than labels": (
        "pathmnist",
        lambda r: {
            "train_images": np.zeros((64, 28, 28, 3), np.uint8),
            "train_labels": np.zeros((10, 1), np.uint8),
        },
        ["train_labels", "(10, 1)", "64"],
    ),
    "pathology label 9 of 9 classes": (
        "pathmnist",
        lambda r: {"train_labels": np.full((N, 1), 9, np.uint8)},
        ["train_labels", "label 9", "0..8"],
    ),
    "negative label": (
        "pathmnist",
        lambda r: {"train_labels": np.full((N, 1), -1, np.int64)},
        ["train_labels", "label -1"],
    ),
    "float labels": (
        "pathmnist",
        lambda r: {"train_labels": np.zeros((N, 1), np.float64)},
        ["train_labels", "float64", "integer"],
    ),
    "missing labels key": ("pathmnist", lambda r: {"train_labels": None}, ["train_labels", "found:"]),
    "missing images key": (
        "organamnist",
        lambda r: {"train_images": None},
        ["organamnist.npz", "train_images"],
    ),
    "object array": (
        "pathmnist",
        lambda r: {"train_labels": np.array([[0]] * N, dtype=object)},
        ["train_labels", "object array"],
    ),
    "gray pathology": (
        "pathmnist",
        lambda r: {"train_images": _pathology(r)[..., 0]},
        ["train_images", "(60, 28, 28)", "x 3 (RGB)"],
    ),
    "RGB radiology": (
        "organamnist",
        lambda r: {"train_images": np.zeros((N, 28, 28, 3), np.uint8)},
        ["organamnist.npz", "train_images", "(gray)"],
    ),
    "radiology label 11 of 11 classes": (
        "organamnist",
        lambda r: {"train_labels": np.full((N, 1), 11, np.uint8)},
        ["organamnist.npz", "label 11", "0..10"],
    ),
}


@pytest.fixture
def data_root(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    return root


def _one_line_error(cfg: DataConfig, path: Path, words: list[str]) -> None:
    with pytest.raises(DataError) as err:
        load_split(cfg, "train")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_npz_is_one_line_naming_file_and_key(data_root: Path, case: str) -> None:
    flag, changes, words = CASES[case]
    path = data_root / f"{flag}.npz"
    arrays = _edit(data_root, flag, **changes(data_root))
    np.savez(path, **arrays)
    _one_line_error(DataConfig(root=str(data_root)), path, words)


def test_object_array_is_refused_without_unpickling(data_root: Path) -> None:
    """A pickled object whose unpickling would run code is refused from the .npy header alone."""

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    arrays = _edit(data_root, "pathmnist", train_labels=np.array([Boom()] * N, dtype=object))
    np.savez(data_root / "pathmnist.npz", **arrays)  # savez pickles the object array (allow_pickle)
    _one_line_error(DataConfig(root=str(data_root)), data_root / "pathmnist.npz", ["object array"])


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"not a zip at all", ["not an npz archive"]),
        (b"PK\x03\x04 truncated zip", ["not a readable npz file"]),
        (b"", ["not an npz archive"]),
    ],
)
def test_files_that_are_not_npz(data_root: Path, content: bytes, words: list[str]) -> None:
    (data_root / "pathmnist.npz").write_bytes(content)
    _one_line_error(DataConfig(root=str(data_root)), data_root / "pathmnist.npz", words)


def test_a_single_npy_array_named_npz(data_root: Path) -> None:
    path = data_root / "pathmnist.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros((3, 28, 28, 3), np.uint8))
    _one_line_error(DataConfig(root=str(data_root)), path, ["not an npz archive"])


def test_a_damaged_member(data_root: Path) -> None:
    """A stored (uncompressed) member with flipped bytes: zip's CRC check refuses it in one line."""
    path = data_root / "pathmnist.npz"
    arrays = _edit(data_root, "pathmnist")
    np.savez(path, **arrays)  # np.savez stores members uncompressed
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("train_images.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200 : info.header_offset + 260] = b"\xff" * 60  # inside the pixel data
    path.write_bytes(bytes(data))
    _one_line_error(DataConfig(root=str(data_root)), path, ["train_images"])


def test_valid_files_still_load(synthetic_root: Path) -> None:
    images, labels = read_npz_split(synthetic_root / "organamnist.npz", "organamnist", "val", 28)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8 and labels.shape == (30, 1)
    # Radiology may also carry an explicit channel axis (N x S x S x 1).
    split = load_split(DataConfig(root=str(synthetic_root)), "val")
    assert split.radiology.shape == (30, 28, 28, 1)


def test_crc_train_refuses_float_images_before_the_run_dir(data_root: Path, tmp_path: Path) -> None:
    arrays = _edit(data_root, "pathmnist", **CASES["float images 0..1"][1](data_root))
    np.savez(data_root / "pathmnist.npz", **arrays)
    out = tmp_path / "run"
    code = "from crc_train.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "--data-root", str(data_root), "--epochs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "train_images is float32" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
