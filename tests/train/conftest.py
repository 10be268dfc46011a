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
