"""Exact explanations in torch: CAMs that add up to the logits, Grad-CAM, the margin split by modality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from crc_train.config import FUSIONS
from crc_train.explain import branch_terms, centre_branch, grad_cam, margin_split, modality_summary
from crc_train.model import FusionNet, ModelConfig, build_model

S = 28
BRANCHES = {
    "attention": ["pathology", "radiology"],
    "late": ["pathology", "radiology"],
    "none": ["pathology"],
    "early": ["fused"],
}


def _inputs(n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(0, 256, (n, S, S, 3), dtype=torch.uint8, generator=g)
    r = torch.randint(0, 256, (n, S, S, 1), dtype=torch.uint8, generator=g)
    return p, r


def _model(fusion: str) -> FusionNet:
    """resnet18 branches with random weights, a random head bias and (attention) open gates."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="resnet18", fusion=fusion, image_size=S, attention_dim=32))
    with torch.no_grad():
        model.head[-1].bias.normal_()
        for block in (model.fusion3, model.fusion4):
            if block is not None:
                block.pathology_gate.fill_(0.5)
                block.radiology_gate.fill_(-0.5)
    return model.eval()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_cams_add_up_to_the_logits_for_every_fusion_mode(fusion: str) -> None:
    model = _model(fusion)
    p, r = _inputs()
    with torch.no_grad():
        logits, cams = model.forward_cams(p, r)
        plain = model(p, r)
        _, bias = model.head_weights()
        recon = sum(c.mean(dim=(-2, -1)) for c in cams.values()) + bias
        features = model.forward_features(p, r)
    assert list(cams) == model.branch_names == BRANCHES[fusion]
    assert torch.equal(logits, plain)  # forward_cams computes the logits as forward does
    for cam in cams.values():
        assert cam.shape == (3, 9, 4, 4)  # 28 px -> layer4 at 4 x 4
    assert plain.abs().max() > 0.1
    torch.testing.assert_close(recon, logits, rtol=0, atol=1e-4)
    # The same split from the pooled embedding (what crc-train evaluate uses), in float64.
    terms, b = branch_terms(model, features.numpy())
    assert list(terms) == BRANCHES[fusion]
    np.testing.assert_allclose(sum(terms.values()) + b, logits.numpy(), rtol=0, atol=1e-4)
    for name, cam in cams.items():
        np.testing.assert_allclose(terms[name], cam.mean(dim=(-2, -1)).numpy(), rtol=0, atol=1e-4)


def test_each_cam_is_its_own_branch() -> None:
    """Late fusion: changing the radiology slice changes the radiology map only."""
    model = _model("late")
    p, r = _inputs(seed=1)
    _, r_other = _inputs(seed=2)
    with torch.no_grad():
        _, a = model.forward_cams(p, r)
        _, b = model.forward_cams(p, r_other)
    assert torch.equal(a["pathology"], b["pathology"])
    assert (a["radiology"] - b["radiology"]).abs().max() > 1e-3


@pytest.mark.parametrize("fusion", ["late", "none"])
def test_grad_cam_is_the_clipped_cam_when_the_head_reads_layer4_directly(fusion: str) -> None:
    model = _model(fusion)
    p, r = _inputs()
    logits, maps = grad_cam(model, p, r)
    with torch.no_grad():
        _, cams = model.forward_cams(p, r)
    predicted = logits.argmax(1)
    for name, gc in maps.items():
        cam = cams[name][torch.arange(3), predicted]
        torch.testing.assert_close(gc, torch.relu(cam) / cam[0].numel(), rtol=1e-4, atol=1e-6)


def test_grad_cam_with_attention_and_early_fusion() -> None:
    attention = _model("attention")
    p, r = _inputs()
    target = torch.tensor([0, 1, 2])
    logits, maps = grad_cam(attention, p, r, target)
    assert list(maps) == ["pathology", "radiology"]
    assert all(m.shape == (3, 4, 4) and (m >= 0).all() for m in maps.values())
    assert torch.equal(logits, attention(p, r).detach())
    assert all(q.grad is None for q in attention.parameters())  # nothing accumulated in the model
    _, early = grad_cam(_model("early"), p, r)
    assert list(early) == ["fused"]


def test_margin_split_and_summary() -> None:
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5], [1.0, 1.0, 0.0]])
    bias = np.array([0.0, 1.0, -1.0])
    pathology = np.array([[1.0, 0.0, 0.0], [0.0, 1.5, 0.0], [0.5, 0.0, 1.0]])
    radiology = logits - bias - pathology
    split = margin_split(logits, {"pathology": pathology, "radiology": radiology}, bias)
    assert split["predicted"].tolist() == [0, 2, 0] and split["runner_up"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(split["margin"], [2.0, 0.5, 0.0])
    np.testing.assert_allclose(split["pathology"] + split["radiology"] + split["bias"], split["margin"])
    summary = modality_summary(split)
    # Decided by radiology (p + bias < 0): pair 1 (p -1.5, bias -2, r 4) and pair 2, a tie that the
    # radiology term (+0.5) lifted from -0.5; pair 0 (p 1, bias -1, r 2) is not.
    assert summary["available"] and summary["n"] == 3
    assert summary["decided_by_radiology"] == pytest.approx(2 / 3)
    share = np.abs(split["radiology"]) / (np.abs(split["pathology"]) + np.abs(split["radiology"]))
    assert summary["mean_radiology_share"] == pytest.approx(share.mean())
    assert sum(summary["radiology_share_histogram"]) == 3
    assert summary["radiology_share_quantiles"]["q50"] == pytest.approx(np.median(share))
    assert not modality_summary({**split, "fused": split.pop("pathology")})["available"]
    none = modality_summary({k: v for k, v in split.items() if k != "radiology"})
    assert not none["available"] and "no radiology branch" in none["reason"]


def test_centring_a_branch_keeps_the_logits_and_moves_its_mean_to_the_bias() -> None:
    rng = np.random.default_rng(0)
    terms = {"pathology": rng.normal(size=(6, 4)), "radiology": rng.normal(size=(6, 4)) + 3.0}
    bias = rng.normal(size=4)
    centred, new_bias = centre_branch(terms, bias)
    np.testing.assert_allclose(sum(centred.values()) + new_bias, sum(terms.values()) + bias)
    np.testing.assert_allclose(centred["radiology"].mean(axis=0), 0.0, atol=1e-12)
    assert centred["pathology"] is terms["pathology"]
    assert centre_branch({"fused": terms["pathology"]}, bias) == ({"fused": terms["pathology"]}, bias)
