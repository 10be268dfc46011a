"""model.explain.onnx: the exact decomposition exported and gated, its shared weights, and a blob it finds."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from crc_export.explain import export_explain_onnx
from crc_runtime.explain import identity_error, overlay
from crc_train.config import FUSIONS
from crc_train.rundir import load_checkpoint, model_from_checkpoint
from PIL import Image

BRANCHES = {
    "attention": ["pathology", "radiology"],
    "late": ["pathology", "radiology"],
    "none": ["pathology"],
    "early": ["fused"],  # one 4-channel ResNet: one map, no modality split
}


def _run_onnx(path, p: np.ndarray, r: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"pathology": p, "radiology": r}), strict=True))


def _random_pairs(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
        rng.integers(0, 256, (n, size, size, 1), dtype=np.uint8),
    )


def test_the_bundle_has_a_gated_explain_artifact_sharing_the_weights(full_bundle):
    bundle, _, output = full_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    (art,) = [a for a in manifest["artifacts"] if a["kind"] == "explain"]
    assert art["file"] == "model.explain.onnx" and art["precision"] == "fp32" and art["usable"] is True
    assert art["branches"] == ["pathology", "radiology"]
    assert [(o["name"], o["shape"]) for o in art["outputs"]] == [
        ("logits", ["batch", 9]),
        ("pathology_cam", ["batch", 9, 4, 4]),
        ("radiology_cam", ["batch", 9, 4, 4]),
        ("bias", ["batch", 9]),
    ]
    assert {"model.explain.onnx", "reference.explain.npz"} <= set(manifest["files"])
    parity = art["parity"]
    assert parity["passed"] is True and parity["top1_agreement"] == 1.0 and parity["max_abs_diff"] <= 1e-3
    explain = parity["explain"]
    assert explain["cam_cell_max_abs_diff"] <= 1e-3  # the gate, in logit units
    assert explain["cam_cell_max_abs_diff"] == pytest.approx(explain["cam_max_abs_diff"] / 16)  # 4 x 4 cells
    assert parity["explain"]["identity_max_abs_diff"] <= 1e-4
    assert "model.explain.onnx" in output
    # The backbone weights are read from model.onnx.data, not stored a second time.
    assert art["external_data"] == ["model.onnx.data"]
    assert (bundle / "model.explain.onnx").stat().st_size < (bundle / "model.onnx.data").stat().st_size / 20
    with np.load(bundle / "reference.explain.npz") as ref:
        assert sorted(ref.files) == ["pathology_cam", "radiology_cam"]
        assert ref["pathology_cam"].shape == (32, 9, 4, 4)


def test_exported_graph_keeps_the_identity_and_torchs_maps_on_new_pairs(full_bundle, tiny_run):
    """dynamo export of the real (resnet18, attention) model: inputs it was not gated on, odd batch."""
    bundle, _, _ = full_bundle
    p, r = _random_pairs(3, seed=5)
    out = _run_onnx(bundle / "model.explain.onnx", p, r)
    cams = {b: out[f"{b}_cam"] for b in ("pathology", "radiology")}
    assert identity_error(out["logits"], cams, out["bias"]).max() <= 1e-4
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt")).eval()
    with torch.no_grad():
        logits, torch_cams = model.forward_cams(torch.from_numpy(p), torch.from_numpy(r))
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=0, atol=1e-3)
    for b in cams:
        np.testing.assert_allclose(cams[b], torch_cams[b].numpy(), rtol=0, atol=1e-3)
    # The explain graph's logits are model.onnx's logits.
    (plain,) = _run_onnx(bundle / "model.onnx", p, r).values()
    np.testing.assert_allclose(out["logits"], plain, rtol=0, atol=1e-5)


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Random head bias, BatchNorm statistics and open attention gates: nothing is zero by luck."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.randn(model.head[-1].bias.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        for block in (model.fusion3, model.fusion4):
            if block is not None:
                block.pathology_gate.fill_(0.7)
                block.radiology_gate.fill_(-0.4)
    return model.eval()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_identity_for_every_fusion_mode_in_torch_and_onnx(fusion, tiny_fusion_net, tmp_path):
    model = _randomise(tiny_fusion_net(fusion))
    assert model.branch_names == BRANCHES[fusion]
    p, r = _random_pairs(3, seed=1)
    with torch.no_grad():
        logits, cams = model.forward_cams(torch.from_numpy(p), torch.from_numpy(r))
        _, bias = model.head_weights()
    assert logits.abs().max() > 0.1  # a real test: the logits are not all ~0
    torch_cams = {b: c.numpy() for b, c in cams.items()}
    assert identity_error(logits.numpy(), torch_cams, bias.detach().numpy()).max() <= 1e-4
    path, external = export_explain_onnx(model, tmp_path / "e.onnx", 28, exporter="torchscript")
    assert external == []  # no model.onnx to share weights with
    out = _run_onnx(path, p, r)
    assert list(out) == ["logits", *(f"{b}_cam" for b in BRANCHES[fusion]), "bias"]
    onnx_cams = {b: out[f"{b}_cam"] for b in BRANCHES[fusion]}
    assert identity_error(out["logits"], onnx_cams, out["bias"]).max() <= 1e-4
    for b in BRANCHES[fusion]:
        np.testing.assert_allclose(onnx_cams[b], torch_cams[b], rtol=0, atol=1e-3)  # the FP32 gate


S = 28
BLOB = 7


def _blob_tiles(rng: np.random.Generator, corners: list[tuple[int, int] | None]) -> np.ndarray:
    """Gray noisy tiles; a white BLOB x BLOB square with its top-left corner at each given corner."""
    tiles = rng.integers(90, 140, size=(len(corners), S, S, 3)).astype(np.uint8)
    for tile, corner in zip(tiles, corners, strict=True):
        if corner is not None:
            tile[corner[0] : corner[0] + BLOB, corner[1] : corner[1] + BLOB] = 255
    return tiles


def _train_blob_model(tiny_fusion_net) -> torch.nn.Module:
    """Late fusion, two classes: 1 = the pathology tile has a blob somewhere, 0 = it has none; the
    radiology slices are noise. About 100 Adam steps on 128 pairs, a few seconds on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy machine makes a thread pool slower than one thread for a net this small
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        n = 128
        labels = np.arange(n) % 2
        corners = [tuple(rng.integers(0, S - BLOB + 1, size=2)) if y else None for y in labels]
        p = torch.from_numpy(_blob_tiles(rng, corners))
        r = torch.from_numpy(rng.integers(0, 256, size=(n, S, S, 1)).astype(np.uint8))
        y = torch.from_numpy(labels)
        model = tiny_fusion_net("late", num_classes=2).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(100):
            idx = torch.from_numpy(rng.choice(n, 32, replace=False))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(p[idx], r[idx]), y[idx]).backward()
            opt.step()
        # BatchNorm statistics of the whole training set (not the running average of the last steps).
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            model(p, r)
        return model.eval()
    finally:
        torch.set_num_threads(threads)


def _quadrant(y: float, x: float, height: float, width: float) -> tuple[int, int]:
    return int(y >= height / 2), int(x >= width / 2)


def test_a_blob_the_model_learned_lights_up_where_it_is(tiny_fusion_net, tmp_path):
    model = _train_blob_model(tiny_fusion_net)
    rng = np.random.default_rng(1)
    corners = [(2, 2), (2, 19), (19, 2), (19, 19)]  # one blob in each quadrant
    tiles = _blob_tiles(rng, corners)
    slices = rng.integers(0, 256, size=(len(corners), S, S, 1)).astype(np.uint8)
    path, _ = export_explain_onnx(model, tmp_path / "blob.onnx", S, exporter="torchscript")
    out = _run_onnx(path, tiles, slices)
    assert out["logits"].argmax(1).tolist() == [1, 1, 1, 1], out["logits"]  # it learned the blob
    for i, corner in enumerate(corners):
        want = _quadrant(corner[0] + BLOB / 2, corner[1] + BLOB / 2, S, S)
        cam = out["pathology_cam"][i, 1]  # the "blob" class, pathology branch
        cy, cx = np.unravel_index(cam.argmax(), cam.shape)
        assert _quadrant(cy + 0.5, cx + 0.5, *cam.shape) == want, (corner, cam.round(1))
        # The runtime's overlay on the tile at another, non-square size: the most yellow region is there.
        big = Image.fromarray(tiles[i]).resize((84, 56), Image.Resampling.NEAREST)
        lo, hi = float(cam.min()), float(cam.max())
        pixels = np.asarray(overlay(big, cam, lo, hi), dtype=np.float64)
        assert pixels.shape == (56, 84, 3)
        yellow = pixels[..., 0] + pixels[..., 1] - 2 * pixels[..., 2]
        y, x = np.unravel_index(yellow.argmax(), yellow.shape)
        assert _quadrant(y, x, 56, 84) == want, corner
