"""Synthetic MedMNIST files, loading through the real medmnist classes, pairing, statistics, errors."""

from __future__ import annotations

from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch
from crc_train.data import (
    DataConfig,
    DataError,
    PairedDataset,
    channel_stats,
    class_names,
    load_split,
    pairing_permutation,
    write_synthetic_medmnist,
)

N_TRAIN, N_VAL, N_TEST = 60, 30, 30  # the sizes the synthetic_root fixture writes (conftest.py)


def test_synthetic_files_use_the_medmnist_layout(synthetic_root: Path) -> None:
    counts = {"train": N_TRAIN, "val": N_VAL, "test": N_TEST}
    with np.load(synthetic_root / "pathmnist.npz") as npz:
        assert sorted(npz.files) == sorted(f"{s}_{k}" for s in counts for k in ("images", "labels"))
        for split, n in counts.items():
            assert npz[f"{split}_images"].shape == (n, 28, 28, 3)
            assert npz[f"{split}_images"].dtype == np.uint8
            assert npz[f"{split}_labels"].shape == (n, 1) and npz[f"{split}_labels"].dtype == np.uint8
            assert set(np.unique(npz[f"{split}_labels"])) == set(range(9))
    with np.load(synthetic_root / "organamnist.npz") as npz:
        for split, n in counts.items():
            assert npz[f"{split}_images"].shape == (n, 28, 28) and npz[f"{split}_images"].dtype == np.uint8
            assert npz[f"{split}_labels"].max() == 10
    # Read back through medmnist's own classes, like real data (no mock).
    ds = medmnist.PathMNIST(split="val", root=str(synthetic_root), size=28)
    assert ds.imgs.shape == (N_VAL, 28, 28, 3)
    organ = medmnist.OrganAMNIST(split="test", root=str(synthetic_root), size=28)
    assert organ.imgs.shape == (N_TEST, 28, 28)


def test_synthetic_size_flag_and_determinism(tmp_path: Path) -> None:
    a = write_synthetic_medmnist(tmp_path / "a", size=64, n_train=9, n_val=9, n_test=9, seed=3)
    b = write_synthetic_medmnist(tmp_path / "b", size=64, n_train=9, n_val=9, n_test=9, seed=3)
    assert sorted(p.name for p in a.iterdir()) == ["organamnist_64.npz", "pathmnist_64.npz"]
    ds = medmnist.PathMNIST(split="train", root=str(a), size=64)
    assert ds.imgs.shape == (9, 64, 64, 3)
    with np.load(a / "pathmnist_64.npz") as x, np.load(b / "pathmnist_64.npz") as y:
        assert np.array_equal(x["train_images"], y["train_images"])


def test_load_split_pairs_with_perm_i_mod_m(tmp_path: Path) -> None:
    root = write_synthetic_medmnist(tmp_path, n_train=40, n_val=12, n_test=12, seed=1)
    # Fewer radiology than pathology samples, so the pairing must wrap around (i mod M).
    with np.load(root / "organamnist.npz") as npz:
        small = {k: npz[k][:15] if k.startswith("train") else npz[k] for k in npz.files}
    np.savez_compressed(root / "organamnist.npz", **small)

    cfg = DataConfig(root=str(root), pairing_seed=7)
    split = load_split(cfg, "train")
    path_imgs = medmnist.PathMNIST(split="train", root=str(root)).imgs
    path_labels = medmnist.PathMNIST(split="train", root=str(root)).labels
    organ = small["train_images"]
    perm = pairing_permutation(7, "train", 15)
    assert sorted(perm) == list(range(15))
    assert split.pathology.shape == (40, 28, 28, 3) and split.radiology.shape == (40, 28, 28, 1)
    assert np.array_equal(split.pathology, path_imgs)
    for i in range(40):
        assert np.array_equal(split.radiology[i, ..., 0], organ[perm[i % 15]])
    assert split.labels.dtype == np.int64 and np.array_equal(split.labels, path_labels[:, 0])
    assert split.classes == class_names() and len(split.classes) == 9

    # Seeded: same seed, same pairing; another seed or another split, another permutation.
    again = load_split(cfg, "train")
    assert np.array_equal(again.radiology, split.radiology)
    other = load_split(DataConfig(root=str(root), pairing_seed=8), "train")
    assert not np.array_equal(other.radiology, split.radiology)
    assert not np.array_equal(pairing_permutation(7, "val", 12), pairing_permutation(7, "test", 12))

    capped = load_split(DataConfig(root=str(root), pairing_seed=7, max_train_pairs=10), "train")
    assert np.array_equal(capped.radiology, split.radiology[:10])


def test_class_names_come_from_medmnist() -> None:
    label = medmnist.INFO["pathmnist"]["label"]
    assert class_names() == [label[str(i)] for i in range(9)]


def test_channel_stats(synthetic_root: Path) -> None:
    split = load_split(DataConfig(root=str(synthetic_root)), "train")
    stats = channel_stats(split)
    assert len(stats["pathology"]["mean"]) == 3 and len(stats["pathology"]["std"]) == 3
    assert len(stats["radiology"]["mean"]) == 1 and len(stats["radiology"]["std"]) == 1
    x = split.pathology.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats["pathology"]["mean"], x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats["pathology"]["std"], x.std(0), rtol=1e-6)
    assert all(0 < v < 1 for v in stats["radiology"]["mean"] + stats["radiology"]["std"])


def test_dataset_items(synthetic_root: Path) -> None:
    ds = PairedDataset(load_split(DataConfig(root=str(synthetic_root)), "val"))
    assert len(ds) == N_VAL
    p, r, y = ds[3]
    assert p.dtype == torch.uint8 and p.shape == (28, 28, 3)
    assert r.dtype == torch.uint8 and r.shape == (28, 28, 1)
    assert isinstance(y, int) and 0 <= y < 9


def test_synthetic_source_writes_then_loads(tmp_path: Path) -> None:
    cfg = DataConfig(
        source="synthetic", root=str(tmp_path), synthetic_train=18, synthetic_val=9, synthetic_test=9
    )
    split = load_split(cfg, "val")
    assert split.pathology.shape == (9, 28, 28, 3)
    assert (tmp_path / "pathmnist.npz").exists()


@pytest.mark.parametrize("make_root", [False, True])
def test_missing_data_is_a_one_line_user_error(tmp_path: Path, make_root: bool) -> None:
    root = tmp_path / "nothing-here"
    if make_root:
        root.mkdir()
    with pytest.raises(DataError) as err:
        load_split(DataConfig(root=str(root), size=64), "train")
    msg = str(err.value)
    assert "\n" not in msg
    assert "--download" in msg and "--data-root" in msg
    assert "pathmnist_64.npz" in msg and "organamnist_64.npz" in msg


def test_unknown_split_is_rejected(synthetic_root: Path) -> None:
    with pytest.raises(DataError, match="unknown split"):
        load_split(DataConfig(root=str(synthetic_root)), "training")
