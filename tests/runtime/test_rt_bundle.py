"""Bundle loading and verification: every refusal is one line naming the file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from crc_runtime.atomic import atomic_path, atomic_write_text
from crc_runtime.bundle import SCHEMA_VERSION, load_bundle, sha256_file, write_manifest
from crc_runtime.errors import BundleError, UserError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    assert isinstance(exc.value, UserError)
    return msg


def test_bundle_loads(tiny):
    bundle = load_bundle(tiny.bundle)
    assert bundle.classes == tiny.classes
    assert bundle.image_size == 8
    assert [i["name"] for i in bundle.inputs] == ["pathology", "radiology"]
    assert bundle.artifact("fp32")["file"] == "model.onnx"
    assert bundle.artifact("model.onnx")["precision"] == "fp32"
    assert [a["file"] for a in bundle.usable_artifacts()] == ["model.onnx"]
    ref = bundle.load_reference()
    assert ref["pathology"].dtype == np.uint8 and ref["logits"].shape == (20, 9)


def test_manifest_is_sorted_and_indented(tmp_path):
    write_manifest(tmp_path, {"b": 1, "a": {"d": 2, "c": 3}, "schema_version": SCHEMA_VERSION})
    text = (tmp_path / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_sha256_mismatch(bundle_copy):
    with open(bundle_copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    msg = _one_line(exc)
    assert "model.onnx" in msg and "sha256" in msg and "re-export" in msg


def test_missing_file(bundle_copy):
    (bundle_copy / "reference.npz").unlink()
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "reference.npz" in _one_line(exc) and "missing" in str(exc.value)


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_unknown_schema_version(bundle_copy, edit_manifest, version):
    edit_manifest(bundle_copy, lambda m: m.update(schema_version=version))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    msg = _one_line(exc)
    assert "manifest.json" in msg and "schema_version" in msg and "upgrade" in msg


def test_manifest_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "manifest.json" in _one_line(exc) and "JSON" in str(exc.value)


def test_no_manifest(tmp_path):
    with pytest.raises(BundleError) as exc:
        load_bundle(tmp_path)
    assert "manifest.json" in _one_line(exc)


@pytest.mark.parametrize("name", ["../model.onnx", "sub/model.onnx", "..", "/etc/passwd"])
def test_files_entry_must_be_plain_name(bundle_copy, edit_manifest, name):
    edit_manifest(bundle_copy, lambda m: m["files"].update({name: "0" * 64}))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    msg = _one_line(exc)
    assert name in msg and "plain file name" in msg


def test_unusable_artifact_refused_with_reason(bundle_copy, edit_manifest):
    reason = "fp32 top1_agreement 0.9 < min_top1_agreement 1"

    def mark(m):
        m["artifacts"][0]["usable"] = False
        m["artifacts"][0]["parity"]["reasons"] = [reason]

    edit_manifest(bundle_copy, mark)
    bundle = load_bundle(bundle_copy)  # the bundle itself is fine; only its artifact is refused
    assert bundle.usable_artifacts() == []
    with pytest.raises(BundleError) as exc:
        bundle.artifact("fp32")
    msg = _one_line(exc)
    assert "model.onnx" in msg and "unusable" in msg and reason in msg


def test_artifact_must_be_listed_in_files(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["files"].pop("model.onnx"))
    bundle = load_bundle(bundle_copy)
    with pytest.raises(BundleError) as exc:
        bundle.artifact("fp32")
    assert "model.onnx" in _one_line(exc) and "files" in str(exc.value)


def test_unknown_artifact(tiny):
    with pytest.raises(BundleError) as exc:
        load_bundle(tiny.bundle).artifact("fp16")
    assert "fp16" in _one_line(exc) and "model.onnx" in str(exc.value)


def test_reference_refuses_pickles(bundle_copy, edit_manifest):
    np.save(bundle_copy / "evil.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.replace(bundle_copy / "evil.npy", bundle_copy / "reference.npz")

    def rehash(m):
        m["files"]["reference.npz"] = sha256_file(bundle_copy / "reference.npz")

    edit_manifest(bundle_copy, rehash)
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy).load_reference()
    assert "reference.npz" in _one_line(exc)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_input_shape_must_match_resize_size(bundle_copy, edit_manifest):
    edit_manifest(bundle_copy, lambda m: m["inputs"][0].update(shape=["batch", 28, 28, 3]))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_copy)
    assert "pathology" in _one_line(exc) and "resize.size" in str(exc.value)


def test_manifest_disagreeing_with_model_is_refused(tiny, bundle_copy, edit_manifest):
    from crc_runtime.predictor import Predictor

    edit_manifest(bundle_copy, lambda m: m["inputs"][1].update(dtype="float32"))
    with pytest.raises(BundleError) as exc:
        Predictor(bundle_copy, "ort-cpu")
    assert "radiology" in _one_line(exc) and "float32" in str(exc.value)
