"""The fusion model: shapes, gradients, identity at init, cross-modal attention, preprocessing."""

from __future__ import annotations

import pytest
import torch
from crc_train.config import BACKBONES, FUSIONS
from crc_train.model import FusionNet, ModelConfig, build_model

S = 28


def _inputs(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 256, (n, S, S, 3), dtype=torch.uint8, generator=g)
    r = torch.randint(0, 256, (n, S, S, 1), dtype=torch.uint8, generator=g)
    return p, r


def _model(backbone: str = "resnet18", fusion: str = "attention", **kw) -> FusionNet:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, fusion=fusion, image_size=S, attention_dim=32, **kw)
    return build_model(cfg)


def _open_gates(model: FusionNet, value: float = 0.5) -> None:
    for block in (model.fusion3, model.fusion4):
        if block is not None:
            with torch.no_grad():
                block.pathology_gate.fill_(value)
                block.radiology_gate.fill_(-value)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shapes(backbone: str, fusion: str) -> None:
    model = _model(backbone, fusion).eval()
    p, r = _inputs()
    with torch.no_grad():
        emb = model.forward_features(p, r)
        logits = model(p, r)
    width = 2048 if backbone == "resnet50" else 512
    assert emb.shape == (2, model.embed_dim)
    assert model.embed_dim == (2 * width if fusion in ("late", "attention") else width)
    assert logits.shape == (2, 9) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(model.forward_head(emb), logits)


def test_module_layout() -> None:
    """The names the FP16 exporter relies on."""
    model = _model(fusion="attention")
    for name in ("preprocess", "pathology", "radiology", "fusion3", "fusion4", "head"):
        assert isinstance(getattr(model, name), torch.nn.Module), name
    late = _model(fusion="late")
    assert late.fusion3 is None and late.fusion4 is None
    assert _model(fusion="none").radiology is None
    assert _model(fusion="early").pathology.conv1.in_channels == 4


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_parameter_gets_a_gradient(fusion: str) -> None:
    model = _model(fusion=fusion, dropout=0.0)
    _open_gates(model)
    model.train()
    p, r = _inputs(4)
    loss = torch.nn.functional.cross_entropy(model(p, r), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    dead = [n for n, q in model.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_attention_blocks_are_identity_at_init() -> None:
    model = _model(fusion="attention").eval()
    feat_p, feat_r = torch.randn(2, 256, 7, 7), torch.randn(2, 256, 7, 7)
    with torch.no_grad():
        out_p, out_r = model.fusion3(feat_p, feat_r)
    assert torch.equal(out_p, feat_p) and torch.equal(out_r, feat_r)

    # With gates at 0 the whole network is the late-fusion network with the same weights.
    late = _model(fusion="late").eval()
    shared = {k: v for k, v in model.state_dict().items() if not k.startswith("fusion")}
    late.load_state_dict(shared)
    p, r = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(p, r), late(p, r), rtol=0, atol=1e-6)


def _pathology_pooled(model: FusionNet, p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(p, r)[:, : model.branch_dim]


def test_radiology_reaches_the_pathology_branch_through_attention() -> None:
    p, r = _inputs(seed=1)
    _, r_other = _inputs(seed=2)

    attention = _model(fusion="attention").eval()
    _open_gates(attention)
    changed = _pathology_pooled(attention, p, r) - _pathology_pooled(attention, p, r_other)
    assert changed.abs().max() > 1e-4, "radiology input does not reach the pathology branch"

    # Contrast: in late fusion the pathology features cannot see radiology.
    late = _model(fusion="late").eval()
    assert torch.equal(_pathology_pooled(late, p, r), _pathology_pooled(late, p, r_other))


def test_fusion_none_ignores_radiology() -> None:
    model = _model(fusion="none").eval()
    p, r = _inputs(seed=1)
    _, r_other = _inputs(seed=2)
    with torch.no_grad():
        assert torch.equal(model(p, r), model(p, r_other))


def test_preprocessing_uses_the_normalization_buffers() -> None:
    norm = {
        "pathology": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7]},
        "radiology": {"mean": [0.4], "std": [0.2]},
    }
    model = build_model(ModelConfig(backbone="resnet18", fusion="late", image_size=S), norm).eval()
    p, r = _inputs()
    pp, rr = model.preprocess(p, r)
    assert pp.shape == (2, 3, S, S) and rr.shape == (2, 1, S, S)
    expected = (p.float() / 255 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.5, 0.6, 0.7])
    torch.testing.assert_close(pp, expected.permute(0, 3, 1, 2))
    torch.testing.assert_close(rr, ((r.float() / 255 - 0.4) / 0.2).permute(0, 3, 1, 2))
    # float 0..255 input gives the same logits as uint8
    with torch.no_grad():
        assert torch.equal(model(p, r), model(p.float(), r.float()))
    assert set(model.state_dict()) >= {"preprocess.pathology_mean", "preprocess.radiology_std"}


def test_bad_config_is_rejected() -> None:
    from crc_train.config import ConfigError

    with pytest.raises(ConfigError, match="backbone"):
        build_model(ModelConfig(backbone="vgg16"))
    with pytest.raises(ConfigError, match="divisible"):
        build_model(ModelConfig(attention_dim=30, attention_heads=4))
