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


def _stage(cin: int, cout: int, stride: int):
    from torch import nn

    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def _tiny_resnet(in_channels: int, widths: tuple[int, int, int, int]):
    """A ResNet-shaped stand-in (conv1, bn1, relu, maxpool, layer1..4, avgpool) a thousand times smaller."""
    from torch import nn

    net = nn.Module()
    net.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
    net.bn1, net.relu, net.maxpool = nn.BatchNorm2d(widths[0]), nn.ReLU(), nn.Identity()
    net.layer1 = _stage(widths[0], widths[0], 1)
    net.layer2 = _stage(widths[0], widths[1], 2)
    net.layer3 = _stage(widths[1], widths[2], 2)
    net.layer4 = _stage(widths[2], widths[3], 2)
    net.avgpool = nn.AdaptiveAvgPool2d(1)
    return net


def make_tiny_fusion_net(fusion: str, num_classes: int = 9, image_size: int = 28):
    """A FusionNet whose branches are tiny ResNet-shaped nets: every FusionNet code path (maps, fusion
    blocks, pooling, head, CAMs) in milliseconds instead of seconds, for tests that train or export
    several models."""
    from crc_train.model import CrossModalAttention, FusionNet, ModelConfig
    from torch import nn

    widths = (8, 16, 16, 32)
    cfg = ModelConfig(backbone="resnet18", fusion=fusion, image_size=image_size, num_classes=num_classes)
    model = FusionNet(cfg)
    model.pathology = _tiny_resnet(4 if fusion == "early" else 3, widths)
    if model.radiology is not None:
        model.radiology = _tiny_resnet(3, widths)
    if fusion == "attention":
        model.fusion3 = CrossModalAttention(widths[2], 8, 2)
        model.fusion4 = CrossModalAttention(widths[3], 8, 2)
    model.branch_dim = widths[3]
    model.embed_dim = widths[3] * len(model.branch_names)
    model.head = nn.Sequential(nn.Dropout(0.0), nn.Linear(model.embed_dim, num_classes))
    return model


@pytest.fixture(scope="session")
def tiny_fusion_net():
    """``tiny_fusion_net(fusion, num_classes=9, image_size=28)``: see ``make_tiny_fusion_net``."""
    return make_tiny_fusion_net
