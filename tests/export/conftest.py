"""A tiny trained run, made once per session in-process, for the export tests."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the export tests need the [export] extra (torch)")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished crc-train run: resnet18 with cross-modal attention on synthetic 28-px data, 1 epoch."""
    from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from crc_train.training import train

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="attention", image_size=28),
        data=DataConfig(source="synthetic", root=str(root / "data"), size=28, max_train_pairs=64),
        train=TrainConfig(epochs=1, batch_size=32, seed=0, device="cpu", out=str(root / "run")),
    )
    train(cfg)
    return root / "run"


@pytest.fixture(scope="session")
def full_bundle(tiny_run, tmp_path_factory):
    """``crc-export`` run through its CLI with the default artifacts (FP32 + FP16 ONNX) and ``--triton``.

    ``--threshold fp16.min_cosine=0.99`` proves a generic override reaches the manifest.

    Returns:
        (bundle folder, Triton repository folder, the CLI's output).
    """
    from click.testing import CliRunner
    from crc_export.cli import export_command

    root = tmp_path_factory.mktemp("full-bundle")
    bundle, triton = root / "bundle", root / "triton"
    args = [str(tiny_run), "-o", str(bundle), "--parity-pairs", "32", "--triton", str(triton)]
    result = CliRunner().invoke(export_command, [*args, "--threshold", "fp16.min_cosine=0.99"])
    assert result.exit_code == 0, result.output
    return bundle, triton, result.output
