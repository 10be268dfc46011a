"""Shared fixtures for the crc_train tests: small synthetic MedMNIST files, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from crc_train.data import write_synthetic_medmnist

N_TRAIN, N_VAL, N_TEST = 60, 30, 30


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with pathmnist.npz and organamnist.npz (28 px, 60/30/30 samples per modality)."""
    return write_synthetic_medmnist(tmp_path_factory.mktemp("medmnist"), 28, N_TRAIN, N_VAL, N_TEST, seed=0)


@pytest.fixture(scope="session")
def small_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run (resnet18, attention fusion, 8 training pairs, no test evaluation).

    Tests that damage its files work on a ``clone_run`` of it, never on the folder itself.
    """
    from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from crc_train.training import train

    out = tmp_path_factory.mktemp("small-run") / "run"
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="attention", image_size=28, attention_dim=32),
        data=DataConfig(root=str(synthetic_root), max_train_pairs=8),
        train=TrainConfig(
            epochs=1, batch_size=4, device="cpu", seed=0, progress=False, evaluate=False, out=str(out)
        ),
    )
    train(cfg)
    return out
