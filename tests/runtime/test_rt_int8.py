"""An INT8 artifact in a bundle: picked on the CPU when usable, named with --artifact, gated, refused.

The INT8 model is the tiny bundle's linear model in QDQ form, built with onnx.helper (no torch, no
quantization tool): the pooled features go through a symmetric INT8 QuantizeLinear / DequantizeLinear
pair and the weights are INT8 with one scale per output column, as crc-export's model.int8.onnx has.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from crc_runtime.backends import choose_artifact, open_backend
from crc_runtime.backends.onnxruntime import OrtBackend
from crc_runtime.bundle import load_bundle, sha256_file, write_manifest
from crc_runtime.cli import cli
from crc_runtime.validate import DEFAULT_THRESHOLDS, parity_row, run_reference
from onnx import TensorProto, helper, numpy_helper

INT8_FILE = "model.int8.onnx"


def build_int8_model(
    path: Path, weight: np.ndarray, bias: np.ndarray, size: int, scale_factor: float = 1.0
) -> None:
    """The tiny model in QDQ form; ``scale_factor`` multiplies every scale (100: a broken model)."""
    classes = weight.shape[1]
    act_scale = np.float32(255.0 / 127.0 * scale_factor)  # the features are means of uint8 pixels
    w_scale = (np.abs(weight).max(axis=0) / 127.0).astype(np.float32)
    w_q = np.clip(np.round(weight / w_scale), -127, 127).astype(np.int8)
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["pathology"], ["p_f"], to=f32),
        helper.make_node("Cast", ["radiology"], ["r_f"], to=f32),
        helper.make_node("ReduceMean", ["p_f"], ["p_m"], axes=[1, 2], keepdims=0),
        helper.make_node("ReduceMean", ["r_f"], ["r_m"], axes=[1, 2], keepdims=0),
        helper.make_node("Concat", ["p_m", "r_m"], ["feat"], axis=1),
        helper.make_node("QuantizeLinear", ["feat", "a_scale", "a_zp"], ["feat_q"]),
        helper.make_node("DequantizeLinear", ["feat_q", "a_scale", "a_zp"], ["feat_dq"]),
        helper.make_node("DequantizeLinear", ["W_q", "w_scale", "w_zp"], ["W_dq"], axis=1),
        helper.make_node("MatMul", ["feat_dq", "W_dq"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(act_scale, dtype=np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "a_zp"),
        numpy_helper.from_array(w_q, "W_q"),
        numpy_helper.from_array(w_scale * np.float32(scale_factor), "w_scale"),
        numpy_helper.from_array(np.zeros(classes, dtype=np.int8), "w_zp"),
        numpy_helper.from_array(bias, "B"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-crc-int8",
        [
            helper.make_tensor_value_info("pathology", TensorProto.UINT8, ["batch", size, size, 3]),
            helper.make_tensor_value_info("radiology", TensorProto.UINT8, ["batch", size, size, 1]),
        ],
        [helper.make_tensor_value_info("logits", f32, ["batch", classes])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _with_int8(tiny, dest: Path, scale_factor: float = 1.0, usable: bool | None = None) -> Path:
    """A copy of the tiny bundle with model.int8.onnx added, gated the way crc-export gates it.

    ``usable`` None records the gate's verdict; True / False overrides it (a bundle gated elsewhere).
    """
    bundle = Path(shutil.copytree(tiny.bundle, dest))
    size = load_bundle(bundle).image_size
    build_int8_model(bundle / INT8_FILE, tiny.weight, tiny.bias, size, scale_factor)
    # A reference set of varied mean colours (the tiny bundle's is uniform noise, all means ~127), so
    # the argmax moves when the features are mangled; its "PyTorch" logits are the numpy twin's.
    rng = np.random.default_rng(1)
    n = 64
    base_p = rng.integers(20, 236, size=(n, 1, 1, 3))
    base_r = rng.integers(20, 236, size=(n, 1, 1, 1))
    pathology = np.clip(base_p + rng.integers(-10, 11, size=(n, size, size, 3)), 0, 255).astype(np.uint8)
    radiology = np.clip(base_r + rng.integers(-10, 11, size=(n, size, size, 1)), 0, 255).astype(np.uint8)
    logits = tiny.logits(pathology, radiology)
    ref = {"pathology": pathology, "radiology": radiology, "labels": logits.argmax(1), "logits": logits}
    np.savez(bundle / "reference.npz", **ref)
    with OrtBackend(bundle / INT8_FILE, "cpu", precision="int8") as backend:
        logits = run_reference(backend, ref, 8)
    parity = {"backend": "ort-cpu", **parity_row(ref, logits, "int8", DEFAULT_THRESHOLDS["int8"])}
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["artifacts"].append(
        {
            "file": INT8_FILE,
            "kind": "onnx",
            "precision": "int8",
            "usable": parity["passed"] if usable is None else usable,
            "parity": parity,
        }
    )
    for name in (INT8_FILE, "reference.npz"):
        manifest["files"][name] = sha256_file(bundle / name)
    write_manifest(bundle, manifest)
    return bundle


@pytest.fixture(scope="module")
def int8_bundle(tiny, tmp_path_factory) -> Path:
    bundle = _with_int8(tiny, tmp_path_factory.mktemp("int8") / "bundle")
    (art,) = [a for a in load_bundle(bundle).artifacts if a["precision"] == "int8"]
    assert art["usable"] is True, art["parity"]["reasons"]  # the good model passes its gate
    return bundle


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _backend_line(output: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith("backend: ")]
    return line


def test_cpu_picks_the_usable_int8_artifact_and_says_why(int8_bundle, csv_copy):
    result = _run(csv_copy, "--bundle", int8_bundle, "--backend", "ort-cpu")
    assert result.exit_code == 0, result.output
    line = _backend_line(result.output)
    assert line.startswith("backend: ort-cpu on model.int8.onnx")
    assert "int8, the fastest usable artifact on cpu" in line
    selection = open_backend(load_bundle(int8_bundle), "auto", device="cpu")
    assert selection.artifact["file"] == INT8_FILE and selection.backend.precision == "int8"
    selection.backend.deactivate()


def test_artifact_by_precision_runs_fp32_or_int8(int8_bundle, csv_copy):
    result = _run(csv_copy, "--bundle", int8_bundle, "--backend", "ort-cpu", "--artifact", "fp32")
    assert result.exit_code == 0, result.output
    assert _backend_line(result.output).startswith("backend: ort-cpu on model.onnx")
    assert "--artifact fp32" in _backend_line(result.output)
    bench = _run(
        "bench", "--bundle", int8_bundle, "--artifact", "int8", "--batch-sizes", "1,4", "--iterations", 2
    )
    assert bench.exit_code == 0, bench.output
    assert "model.int8.onnx, int8" in _backend_line(bench.output)


def test_validate_gates_the_int8_row_with_its_own_thresholds(int8_bundle):
    result = _run("validate", int8_bundle, "--device", "cpu")
    assert result.exit_code == 0, result.output
    (row,) = [line.split() for line in result.output.splitlines() if line.startswith(INT8_FILE)]
    assert row[1:3] == ["ort-cpu", "int8"] and row[-1] == "PASS"
    assert "PASSED: 2 artifact(s)" in result.output


def test_broken_int8_fails_validate(tiny, tmp_path):
    """Scales x 100 (recorded usable, as a bundle gated on another machine might be): validate FAILS it."""
    bundle = _with_int8(tiny, tmp_path / "bundle", scale_factor=100.0, usable=True)
    (art,) = [a for a in load_bundle(bundle).artifacts if a["precision"] == "int8"]
    assert art["parity"]["passed"] is False  # the gate itself refuses it
    result = _run("validate", bundle, "--device", "cpu")
    assert result.exit_code == 1, result.output
    (row,) = [line.split() for line in result.output.splitlines() if line.startswith(INT8_FILE)]
    assert row[-1] == "FAIL" and "int8 top1_agreement" in result.output
    assert "FAILED: 1 artifact(s) failed" in result.output


def test_unusable_int8_is_refused_and_auto_falls_back_to_fp32(tiny, tmp_path, csv_copy):
    bundle = _with_int8(tiny, tmp_path / "bundle", scale_factor=100.0)
    (art,) = [a for a in load_bundle(bundle).artifacts if a["precision"] == "int8"]
    assert art["usable"] is False and art["parity"]["reasons"]
    named = _run(csv_copy, "--bundle", bundle, "--artifact", "int8")
    assert named.exit_code == 1
    assert named.output.count("\n") == 1 and named.output.startswith("error: ")
    assert "model.int8.onnx: marked unusable in manifest.json (int8 top1_agreement" in named.output
    auto = _run(csv_copy, "--bundle", bundle, "--backend", "ort-cpu")
    assert auto.exit_code == 0, auto.output
    line = _backend_line(auto.output)
    assert line.startswith("backend: ort-cpu on model.onnx") and "(no usable int8)" in line


def test_int8_on_a_bundle_without_it_is_one_line(tiny, csv_copy):
    for command in (
        [csv_copy, "--bundle", tiny.bundle, "--artifact", "int8"],
        ["bench", "--bundle", tiny.bundle, "--artifact", "int8"],
    ):
        result = _run(*command)
        assert result.exit_code == 1
        assert result.output.count("\n") == 1, result.output
        assert result.output.startswith("error: ") and "no artifact 'int8' in manifest.json" in result.output
        assert "model.onnx (fp32)" in result.output  # lists what the bundle has


def test_choose_artifact_preference(int8_bundle, tiny):
    with_int8, without = load_bundle(int8_bundle), load_bundle(tiny.bundle)
    assert choose_artifact(with_int8, "cpu")[0]["file"] == INT8_FILE
    assert choose_artifact(without, "cpu")[0]["file"] == "model.onnx"
    assert choose_artifact(with_int8, "cpu", "model.onnx")[0]["file"] == "model.onnx"
    # On CUDA the FP16 model comes first, then FP32: INT8 there is TensorRT's, not onnxruntime's.
    assert choose_artifact(with_int8, "cuda")[0]["file"] == "model.onnx"
