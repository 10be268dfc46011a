"""crc-export on a tiny real run: the bundle's files, the ONNX contract, and a gate that can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from crc_export.build import ExportConfig, build_bundle
from crc_export.cli import export_command
from crc_export.onnx import move_weights_out
from crc_runtime.bundle import load_bundle, sha256_file
from crc_runtime.errors import UserError
from crc_train.rundir import load_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    result = build_bundle(tiny_run, out, ExportConfig(parity_pairs=24, fp16=False, explain=False))
    assert result.passed
    return out


FILES = ("model.onnx", "model.onnx.data", "reference.npz")


def test_bundle_files_and_manifest(bundle, tiny_run):
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", *FILES]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 1
    assert manifest["files"] == {name: sha256_file(bundle / name) for name in FILES}
    ckpt = load_checkpoint(tiny_run / "checkpoint.pt")
    assert manifest["classes"] == ckpt["classes"]
    assert manifest["model"] == {
        "architecture": "dual-resnet",
        "backbone": "resnet18",
        "fusion": "attention",
        "image_size": 28,
    }
    assert manifest["resize"]["filter"] == "BILINEAR" and manifest["resize"]["size"] == [28, 28]
    assert manifest["reference"]["pairs"] == 24
    assert manifest["provenance"]["run_id"] == ckpt["run_id"]
    (artifact,) = manifest["artifacts"]
    assert artifact["file"] == "model.onnx" and artifact["usable"] is True
    assert artifact["external_data"] == ["model.onnx.data"]
    assert artifact["parity"]["top1_agreement"] == 1.0 and artifact["parity"]["max_abs_diff"] <= 1e-3
    # The runtime accepts what the exporter wrote.
    assert load_bundle(bundle).classes == ckpt["classes"]


def test_fp32_weights_live_in_the_external_data_file(bundle):
    """The graph holds no weight over 1 KiB; each points, by a relative location, into model.onnx.data."""
    proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) > 50  # resnet18 x 2 branches + attention + head
    locations = {entry.value for t in external for entry in t.external_data if entry.key == "location"}
    assert locations == {"model.onnx.data"}
    inline = [t for t in proto.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) <= 1024 for t in inline)
    assert (bundle / "model.onnx").stat().st_size < (bundle / "model.onnx.data").stat().st_size / 20
    # Readable like the rest of the bundle (onnx itself creates the data file private).
    mode = (bundle / "model.onnx").stat().st_mode & 0o777
    assert (bundle / "model.onnx.data").stat().st_mode & 0o777 == mode


def test_embedded_weights_make_one_file(tiny_run, tmp_path):
    out = tmp_path / "embedded"
    cfg = ExportConfig(parity_pairs=8, fp16=False, external_data=False, explain=False)
    result = build_bundle(tiny_run, out, cfg)
    assert result.passed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "reference.npz"]
    (artifact,) = result.manifest["artifacts"]
    assert "external_data" not in artifact
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_reference_set_holds_uint8_pairs_and_torch_logits(bundle, tiny_run):
    with np.load(bundle / "reference.npz", allow_pickle=False) as ref:
        assert ref["pathology"].dtype == np.uint8 and ref["pathology"].shape == (24, 28, 28, 3)
        assert ref["radiology"].dtype == np.uint8 and ref["radiology"].shape == (24, 28, 28, 1)
        assert ref["labels"].dtype == np.int64 and ref["logits"].shape == (24, 9)
        model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt"))
        with torch.no_grad():
            logits = model(torch.from_numpy(ref["pathology"]), torch.from_numpy(ref["radiology"])).numpy()
        np.testing.assert_allclose(ref["logits"], logits, rtol=0, atol=1e-5)


def test_onnx_is_uint8_nhwc_with_dynamic_batch(bundle, tiny_run):
    import onnxruntime as ort

    graph = onnx.load(str(bundle / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["pathology", "radiology"]
    assert [o.name for o in graph.output] == ["logits"]
    for inp, channels in zip(graph.input, (3, 1), strict=True):
        dims = inp.type.tensor_type.shape.dim
        assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [28, 28, channels]
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt"))
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (1, 3, 7):  # 1 and odd sizes: the export used a batch of 2
        p = rng.integers(0, 256, (batch, 28, 28, 3), dtype=np.uint8)
        r = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
        (onnx_logits,) = session.run(None, {"pathology": p, "radiology": r})
        with torch.no_grad():
            torch_out = model(torch.from_numpy(p), torch.from_numpy(r)).numpy()
        np.testing.assert_allclose(onnx_logits, torch_out, rtol=0, atol=1e-4)


def test_gate_fails_on_a_damaged_model(tiny_run, tmp_path, monkeypatch):
    """Scale the head's weights inside the ONNX file after export: the gate must refuse it."""
    import crc_export.build as build

    real_export = build.export_onnx

    def export_then_damage(model, path, *args, **kwargs):
        path = real_export(model, path, *args, **kwargs)
        proto = onnx.load(str(path))
        (target,) = [t for t in proto.graph.initializer if len(t.dims) == 2 and 9 in t.dims]  # the head
        weights = onnx.numpy_helper.to_array(target) * 3.0 + 0.5
        target.CopyFrom(onnx.numpy_helper.from_array(weights.astype(np.float32), target.name))
        onnx.save(proto, str(path))
        move_weights_out(path)  # back to the bundle's layout: graph + model.onnx.data
        return path

    monkeypatch.setattr(build, "export_onnx", export_then_damage)
    out = tmp_path / "damaged"
    result = build_bundle(tiny_run, out, ExportConfig(parity_pairs=24, fp16=False, explain=False))
    assert not result.passed
    (artifact,) = result.manifest["artifacts"]
    assert artifact["usable"] is False
    assert artifact["parity"]["max_abs_diff"] > 1e-3 and artifact["parity"]["reasons"]
    # The runtime refuses to run the unusable artifact, with the recorded reason.
    with pytest.raises(UserError, match="model.onnx"):
        load_bundle(out).artifact("model.onnx")


def test_cli_exit_codes(tiny_run, tmp_path):
    from click.testing import CliRunner

    runner = CliRunner()
    ok = runner.invoke(
        export_command,
        [
            str(tiny_run),
            "-o",
            str(tmp_path / "b"),
            "--parity-pairs",
            "8",
            "--exporter",
            "torchscript",
            "--no-fp16",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1] == "PASSED"
    again = runner.invoke(export_command, [str(tiny_run), "-o", str(tmp_path / "b"), "--no-fp16"])
    assert again.exit_code == 1 and "--overwrite" in again.output
    missing = runner.invoke(export_command, [str(tmp_path / "nope"), "-o", str(tmp_path / "c"), "--no-fp16"])
    assert missing.exit_code == 1 and "nope" in missing.output and "Traceback" not in missing.output
    assert not (tmp_path / "c").exists()


def test_missing_extra_is_one_line():
    """With torch unimportable, crc-export names the extra to install instead of a traceback."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.argv = ['crc-export', 'run', '-o', 'b']\n"
        "from crc_export.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "crc-export needs the export extra: pip install 'crc-fusion[export]' (missing: torch)"
    ]
