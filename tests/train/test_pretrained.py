"""--pretrained PATH (a saved torchvision state dict; ImageNet needs internet) and --freeze-epochs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.errors import ConfigError
from crc_train.model import build_model, load_pretrained
from crc_train.training import resume, train


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state dict saved to a file (stands in for the ImageNet weights)."""
    torch.manual_seed(123)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(state, path)
    return path, state


def _expected(key: str, value: torch.Tensor, in_channels: int, small: bool) -> torch.Tensor:
    if key != "conv1.weight":
        return value
    w = value[:, :, 2:5, 2:5] if small else value  # centre 3x3 of the 7x7 for 28/64 px
    return torch.cat([w, w.mean(1, keepdim=True)], 1) if in_channels == 4 else w


@pytest.mark.parametrize(("fusion", "size"), [("late", 28), ("early", 28), ("attention", 128)])
def test_branches_get_the_saved_weights(resnet18_file, fusion: str, size: int) -> None:  # noqa: ANN001
    path, state = resnet18_file
    model = build_model(ModelConfig(backbone="resnet18", fusion=fusion, image_size=size, attention_dim=16))
    load_pretrained(model, str(path), "resnet18")
    branches = [model.pathology] + ([model.radiology] if model.radiology is not None else [])
    assert len(branches) == (1 if fusion == "early" else 2)
    for net in branches:
        got = net.state_dict()
        in_channels = net.conv1.weight.shape[1]
        for key, value in state.items():
            if key.startswith("fc."):
                assert key not in got  # our head is new
                continue
            assert torch.equal(got[key], _expected(key, value, in_channels, size < 128)), key


def test_weights_of_another_backbone_are_one_line_errors(resnet18_file, tmp_path: Path) -> None:  # noqa: ANN001
    path, _ = resnet18_file
    model = build_model(ModelConfig(backbone="resnet34", fusion="late", image_size=28))
    with pytest.raises(ConfigError, match="does not fit a resnet34 branch") as exc:
        load_pretrained(model, str(path), "resnet34")
    assert "\n" not in str(exc.value)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="cannot read"):
        load_pretrained(model, str(tmp_path / "junk.pth"), "resnet34")
    with pytest.raises(ConfigError, match="not found"):
        load_pretrained(model, str(tmp_path / "missing.pth"), "resnet34")


def test_freeze_then_unfreeze(resnet18_file, synthetic_root: Path, tmp_path: Path) -> None:  # noqa: ANN001
    path, state = resnet18_file
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="late", image_size=28, pretrained=str(path)),
        data=DataConfig(source="medmnist", root=str(synthetic_root), max_train_pairs=8),
        train=TrainConfig(
            epochs=1, batch_size=4, freeze_epochs=1, device="cpu", progress=False, evaluate=False,
            out=str(tmp_path / "run"),
        ),
    )  # fmt: skip
    frozen = train(cfg).model
    params = dict(frozen.pathology.named_parameters())
    # epoch 1: the backbone weights are still the pretrained ones; the head trained
    for key, value in params.items():
        assert torch.equal(value.detach(), _expected(key, state[key], 3, True)), key
    assert all(p.requires_grad is False for p in params.values())
    head_after_1 = frozen.head[1].weight.detach().clone()

    # epoch 2 (resumed, so the pretrained file is not read again): the backbones train
    thawed = resume(tmp_path / "run", epochs=2).model
    assert not torch.equal(thawed.pathology.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert not torch.equal(
        thawed.radiology.conv1.weight, _expected("conv1.weight", state["conv1.weight"], 3, True)
    )
    assert not torch.equal(thawed.head[1].weight, head_after_1)


def test_missing_weights_fail_before_the_run_dir_exists(synthetic_root: Path, tmp_path: Path) -> None:
    cfg = RunConfig(
        model=ModelConfig(
            backbone="resnet18", fusion="late", image_size=28, pretrained=str(tmp_path / "no.pth")
        ),
        data=DataConfig(source="medmnist", root=str(synthetic_root), max_train_pairs=8),
        train=TrainConfig(epochs=1, device="cpu", progress=False, out=str(tmp_path / "run")),
    )
    with pytest.raises(ConfigError, match="not found"):
        train(cfg)
    assert not (tmp_path / "run").exists()
