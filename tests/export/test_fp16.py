"""model.fp16.onnx: really FP16 where it should be, FP32 where it must be, gated, and refused when damaged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from crc_export.fp16 import FP16_FILE, make_fp16_model, precision_summary
from crc_runtime.bundle import load_bundle, sha256_file
from crc_runtime.errors import BundleError
from crc_runtime.validate import DEFAULT_THRESHOLDS
from crc_train.rundir import load_checkpoint, model_from_checkpoint


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _fp16_entry(manifest):
    (entry,) = [a for a in manifest["artifacts"] if a["file"] == FP16_FILE]
    return entry


def test_bundle_lists_the_fp16_artifact_with_its_parity(full_bundle):
    bundle, _, output = full_bundle
    manifest = _manifest(bundle)
    assert manifest["files"][FP16_FILE] == sha256_file(bundle / FP16_FILE)
    entry = _fp16_entry(manifest)
    assert entry["kind"] == "onnx" and entry["precision"] == "fp16" and entry["usable"] is True
    parity = entry["parity"]
    assert parity["backend"] == "ort-cpu" and parity["pairs"] == 32 and parity["passed"] is True
    assert parity["thresholds"] == {
        **DEFAULT_THRESHOLDS["fp16"],
        "min_cosine": 0.99,
    }  # the --threshold override
    assert parity["top1_agreement"] >= 0.995 and parity["cosine"] >= 0.99
    for key in ("accuracy", "reference_accuracy", "max_abs_diff", "mean_abs_diff"):
        assert isinstance(parity[key], float)
    assert set(parity["would_pass_with"]) == set(parity["thresholds"])
    assert parity["would_pass_with"]["min_top1_agreement"] == parity["top1_agreement"]
    # FP16 is not FP32: the logits differ, a little.
    assert 0 < parity["max_abs_diff"] < 0.5
    assert "model.fp16.onnx" in output and output.strip().splitlines()[-1] == "PASSED"


def test_fp16_graph_has_fp16_convs_and_fp32_softmax_pooling_head(full_bundle):
    bundle, _, _ = full_bundle
    summary = precision_summary(bundle / FP16_FILE)
    assert summary == _fp16_entry(_manifest(bundle))["graph"]
    # resnet18 x 2 branches = 2 x 20 convs (BN folded or not); the two attention blocks have 8 1x1 convs each.
    assert summary["conv_fp16"] == 40 and summary["conv_total"] == 40 + 16
    assert summary["softmax_total"] == 4 and summary["softmax_fp32"] == 4  # 2 blocks x 2 directions
    assert summary["casts_to_fp16"] >= 2 and summary["casts_to_fp32"] >= 4
    assert summary["input_pathology"] == summary["input_radiology"] == "UINT8"
    assert summary["output_logits"] == "FLOAT"
    graph = onnx.load(str(bundle / FP16_FILE)).graph
    head = [t for t in graph.initializer if len(t.dims) == 2 and 9 in t.dims]
    assert head and all(t.data_type == onnx.TensorProto.FLOAT for t in head)
    # The z-score constants stay FP32: no 3-value FP16 tensor (pathology mean/std) anywhere.
    assert not [
        t for t in graph.initializer if list(t.dims) == [3] and t.data_type == onnx.TensorProto.FLOAT16
    ]
    # Pooling runs on FP32: every ReduceMean / GlobalAveragePool input comes from an FP32 cast or op.
    fp32 = onnx.shape_inference.infer_shapes(onnx.load(str(bundle / FP16_FILE))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*fp32.value_info, *fp32.input, *fp32.output)}
    pools = [n for n in fp32.node if n.op_type in ("ReduceMean", "GlobalAveragePool")]
    assert pools and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in pools)


def test_fp16_onnx_follows_torch_at_any_batch(full_bundle, tiny_run):
    import onnxruntime as ort

    bundle, _, _ = full_bundle
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt")).eval()
    session = ort.InferenceSession(str(bundle / FP16_FILE), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        p = rng.integers(0, 256, (batch, 28, 28, 3), dtype=np.uint8)
        r = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
        (logits,) = session.run(None, {"pathology": p, "radiology": r})
        with torch.no_grad():
            ref = model(torch.from_numpy(p), torch.from_numpy(r)).numpy()
        assert logits.dtype == np.float32 and logits.shape == (batch, 9)
        # FP16 backbones: ~3 significant digits on logits of order 1.
        np.testing.assert_allclose(logits, ref, rtol=0, atol=0.05)


def test_make_fp16_model_leaves_the_trained_model_untouched(tiny_run):
    model = model_from_checkpoint(load_checkpoint(tiny_run / "checkpoint.pt")).eval()
    mixed = make_fp16_model(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    dtypes = {name: p.dtype for name, p in mixed.named_parameters()}
    assert dtypes["pathology.layer4.module.1.conv2.weight"] == torch.float16
    assert dtypes["radiology.conv1.module.weight"] == torch.float16
    assert dtypes["fusion3.module.pathology_q.weight"] == torch.float32
    assert dtypes["head.module.1.weight"] == torch.float32
    assert mixed.preprocess.pathology_mean.dtype == torch.float32


def test_fp16_gate_fails_on_a_damaged_model(tiny_run, tmp_path, monkeypatch):
    """Damaged FP16 conv weights: FAILED, exit 1, unusable, refused by the runtime and by validate."""
    import crc_export.build as build
    from crc_export.cli import export_command
    from crc_runtime.cli import cli as infer_cli

    real_export = build.export_fp16_onnx

    def export_then_damage(model, path, *args, **kwargs):
        path = real_export(model, path, *args, **kwargs)
        proto = onnx.load(str(path))
        fp16 = [
            t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16 and len(t.dims) == 4
        ]
        for target in fp16[-8:]:  # the last stages of both branches: scaled and biased far off
            weights = onnx.numpy_helper.to_array(target).astype(np.float32) * -4.0 + 0.05
            target.CopyFrom(onnx.numpy_helper.from_array(weights.astype(np.float16), target.name))
        onnx.save(proto, str(path))
        return path

    monkeypatch.setattr(build, "export_fp16_onnx", export_then_damage)
    out = tmp_path / "damaged"
    result = CliRunner().invoke(
        export_command, [str(tiny_run), "-o", str(out), "--parity-pairs", "32", "--no-explain"]
    )
    assert result.exit_code == 1, result.output
    assert "FAILED: model.fp16.onnx" in result.output
    manifest = _manifest(out)
    fp32, fp16 = manifest["artifacts"]
    assert fp32["usable"] is True
    assert fp16["usable"] is False and fp16["parity"]["passed"] is False
    assert fp16["parity"]["top1_agreement"] < 0.995
    assert any("would pass with" in reason for reason in fp16["parity"]["reasons"])
    with pytest.raises(BundleError, match="model.fp16.onnx: marked unusable"):
        load_bundle(out).artifact("fp16")
    # crc-infer validate shows the row as skipped with the recorded reason and still passes on FP32.
    shown = CliRunner().invoke(infer_cli, ["validate", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "skipped" in shown.output and "marked unusable by crc-export" in shown.output


def test_crc_infer_validate_prints_the_fp16_row(full_bundle):
    from crc_runtime.cli import cli as infer_cli

    bundle, _, export_output = full_bundle
    shown = CliRunner().invoke(infer_cli, ["validate", str(bundle)])
    assert shown.exit_code == 0, shown.output
    rows = {line.split()[0]: line.split() for line in shown.output.splitlines() if line.startswith("model.")}
    assert rows["model.onnx"][1:3] == ["ort-cpu", "fp32"] and rows["model.onnx"][-1] == "PASS"
    assert rows["model.fp16.onnx"][1:3] == ["ort-cpu", "fp16"] and rows["model.fp16.onnx"][-1] == "PASS"
    # Same numbers as crc-export printed: the same artifact on the same reference set.
    exported = [line for line in export_output.splitlines() if line.startswith("model.fp16.onnx")]
    assert exported and exported[0].split() == rows["model.fp16.onnx"]
