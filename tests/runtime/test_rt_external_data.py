"""Bundles whose model.onnx keeps its weights in model.onnx.data (what crc-export writes by default)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from crc_runtime.backends import open_backend
from crc_runtime.bundle import load_bundle, sha256_file
from crc_runtime.errors import BundleError
from crc_runtime.validate import validate_bundle

DATA = "model.onnx.data"


@pytest.fixture
def external(tiny, tmp_path, edit_manifest) -> Path:
    """The tiny bundle with its weights moved to model.onnx.data and the manifest updated to match."""
    bundle = Path(shutil.copytree(tiny.bundle, tmp_path / "bundle"))
    model = onnx.load(str(bundle / "model.onnx"))
    onnx.save_model(
        model, str(bundle / "model.onnx"), save_as_external_data=True, location=DATA, size_threshold=0
    )

    def split(manifest: dict) -> None:
        manifest["files"]["model.onnx"] = sha256_file(bundle / "model.onnx")
        manifest["files"][DATA] = sha256_file(bundle / DATA)
        manifest["artifacts"][0]["external_data"] = [DATA]

    edit_manifest(bundle, split)
    return bundle


def test_weights_really_are_outside_the_graph(external):
    proto = onnx.load(str(external / "model.onnx"), load_external_data=False)
    assert {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == {
        "W",
        "B",
    }


def test_runs_and_validates_like_the_single_file_bundle(external, tiny):
    bundle = load_bundle(external)
    assert bundle.artifact("fp32")["external_data"] == [DATA]
    rng = np.random.default_rng(1)
    p = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    r = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    selection = open_backend(bundle, "ort-cpu")
    try:
        logits = selection.backend.infer({"pathology": p, "radiology": r})["logits"]
        np.testing.assert_allclose(logits, tiny.logits(p, r), rtol=1e-5, atol=1e-4)
    finally:
        selection.backend.deactivate()
    (row,) = validate_bundle(bundle, batch_size=8)
    assert row["passed"] is True and row["top1_agreement"] == 1.0


def test_altered_weights_are_refused(external):
    with open(external / DATA, "r+b") as fh:
        fh.write(b"\xff\xff\xff\xff")
    with pytest.raises(BundleError, match=r"model\.onnx\.data: sha256"):
        load_bundle(external)


def test_missing_weights_are_refused(external):
    (external / DATA).unlink()
    with pytest.raises(BundleError, match=r"model\.onnx\.data: listed in manifest.json but missing"):
        load_bundle(external)


def test_weights_not_listed_in_files_are_not_run(external, edit_manifest):
    """An artifact whose weights are not in 'files' (so were never verified) is neither picked nor run."""
    edit_manifest(external, lambda m: m["files"].pop(DATA))
    bundle = load_bundle(external)
    assert bundle.usable_artifacts() == []
    with pytest.raises(BundleError, match=r"model\.onnx\.data: not listed in manifest.json 'files'"):
        bundle.artifact("fp32")
    with pytest.raises(BundleError, match="not listed"):
        validate_bundle(bundle, batch_size=8)


@pytest.mark.parametrize("value", ["model.onnx.data", ["../model.onnx.data"], ["sub/w.data"], [3], None])
def test_bad_external_data_entries_are_refused(external, edit_manifest, value):
    edit_manifest(external, lambda m: m["artifacts"][0].update(external_data=value))
    with pytest.raises(BundleError, match="external_data") as exc:
        load_bundle(external)
    assert "\n" not in str(exc.value)
