"""The Triton model repository: every config.pbtxt parses with Triton's own ModelConfig protobuf schema."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnxruntime as ort
import pytest
from crc_export.triton import model_config, write_triton_repository
from crc_runtime.bundle import sha256_file
from crc_runtime.errors import UserError


@pytest.fixture(scope="module")
def model_config_pb2():
    """Triton's generated ``model_config_pb2`` from the tritonclient wheel, loaded by path.

    ``tritonclient.grpc/__init__`` imports grpc (and tritonclient[grpc] pins protobuf < 7, which onnx
    here outgrew), so only the one generated file is loaded; it needs nothing but ``google.protobuf``.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (pip install 'crc-fusion[test]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _parse(pb2, text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, pb2.ModelConfig())


def test_repository_configs_parse_with_tritons_schema(full_bundle, model_config_pb2):
    bundle, triton, output = full_bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert f"triton repository: {triton}" in output
    assert sorted(p.name for p in triton.iterdir()) == ["crc_fusion_fp16_onnx", "crc_fusion_onnx"]
    pb2 = model_config_pb2
    for name, source in (("crc_fusion_onnx", "model.onnx"), ("crc_fusion_fp16_onnx", "model.fp16.onnx")):
        config = _parse(pb2, (triton / name / "config.pbtxt").read_text())
        assert config.name == name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 256  # --max-batch default
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            ("pathology", pb2.TYPE_UINT8, [28, 28, 3]),
            ("radiology", pb2.TYPE_UINT8, [28, 28, 1]),
        ]
        (out,) = config.output
        assert (out.name, out.data_type, list(out.dims)) == ("logits", pb2.TYPE_FP32, [9])
        assert config.HasField("dynamic_batching")
        labels = (triton / name / out.label_filename).read_text().splitlines()
        assert labels == manifest["classes"]
        if source == "model.onnx":  # external weights: Triton's folder form, 1/model.onnx/{graph, weights}
            folder = triton / name / "1" / "model.onnx"
            assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
            for file in ("model.onnx", "model.onnx.data"):
                assert sha256_file(folder / file) == manifest["files"][file]
            # onnxruntime (Triton's backend) finds the weights beside the graph inside that folder.
            session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == ["pathology", "radiology"]
        else:
            assert sha256_file(triton / name / "1" / "model.onnx") == manifest["files"][source]


def test_tensorrt_model_and_unusable_artifacts(tmp_path, model_config_pb2):
    """Layout for a bundle with an engine (a placeholder file: the repository only copies it)."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("model.onnx", "model.fp16.onnx", "gpu_sm90_trt10.13.0.plan"):
        (bundle / name).write_bytes(name.encode())
    manifest = {
        "classes": ["a", "b", "c"],
        "inputs": [
            {"name": "pathology", "dtype": "uint8", "shape": ["batch", 64, 64, 3]},
            {"name": "radiology", "dtype": "uint8", "shape": ["batch", 64, 64, 1]},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
        "artifacts": [
            {"file": "model.onnx", "kind": "onnx", "precision": "fp32", "usable": True},
            {"file": "model.fp16.onnx", "kind": "onnx", "precision": "fp16", "usable": False},
            {"file": "gpu_sm90_trt10.13.0.plan", "kind": "tensorrt", "precision": "fp16", "usable": True},
        ],
    }
    repo = tmp_path / "repo"
    names = write_triton_repository(bundle, repo, manifest, model_name="crc", max_batch_size=32)
    assert names == ["crc_onnx", "crc_trt"]  # the unusable FP16 ONNX is left out
    assert sorted(p.name for p in repo.iterdir()) == ["crc_onnx", "crc_trt"]
    assert (repo / "crc_trt" / "1" / "model.plan").read_bytes() == b"gpu_sm90_trt10.13.0.plan"
    config = _parse(model_config_pb2, (repo / "crc_trt" / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 32
    assert [list(i.dims) for i in config.input] == [[64, 64, 3], [64, 64, 1]]
    (group,) = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and group.count == 1
    # A second write into the non-empty folder needs overwrite.
    with pytest.raises(UserError, match="--overwrite"):
        write_triton_repository(bundle, repo, manifest, model_name="crc", max_batch_size=32)
    write_triton_repository(bundle, repo, manifest, model_name="crc", max_batch_size=8, overwrite=True)
    assert _parse(model_config_pb2, (repo / "crc_onnx" / "config.pbtxt").read_text()).max_batch_size == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".repo.partial")]


def test_bad_requests_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="model name"):
        write_triton_repository(tmp_path, tmp_path / "r", {"classes": [], "artifacts": []}, model_name="a/b")
    with pytest.raises(UserError, match="no usable artifact"):
        write_triton_repository(tmp_path, tmp_path / "r", {"classes": ["a"], "artifacts": []})
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="max_batch_size"):
        model_config("m", "onnxruntime_onnx", [], [], 0)
