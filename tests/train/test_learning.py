"""The model learns: resnet18 with attention fusion on synthetic 28 px data beats chance by far."""

from __future__ import annotations

import json
import time
from pathlib import Path

from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.training import train


def test_resnet18_learns_synthetic_data(tmp_path: Path) -> None:
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="attention", image_size=28),
        data=DataConfig(
            source="synthetic",
            root=str(tmp_path / "data"),
            synthetic_train=320,
            synthetic_val=90,
            synthetic_test=180,
        ),
        train=TrainConfig(epochs=3, batch_size=32, lr=1e-3, seed=0, device="cpu", out=str(tmp_path / "run")),
    )
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    # Chance is 1/9 = 11 %. The synthetic classes are separable from hue + stripe pattern but noisy; a
    # 3-epoch run on 320 pairs reached 0.97 when this was written (~25 s on 2 cores). 0.5 (4.5x chance)
    # leaves room for CPU/BLAS numeric differences and an unlucky seed, while a broken model, loss,
    # label pairing or preprocessing stays near chance and fails.
    assert metrics["accuracy"] >= 0.5, (metrics, seconds)
    assert metrics["macro_f1"] >= 0.4, metrics
