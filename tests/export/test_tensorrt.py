"""crc-export --trt: engine naming, one-line refusals without TensorRT, and the real build where it can run.

The build tests need TensorRT and a CUDA device; they skip with the reason otherwise. TensorRT is never
mocked: what runs here without it is the code that must work without it.
"""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from crc_export.cli import export_command
from crc_export.tensorrt import TrtConfig, _profile_shapes, builder_config, engine_file_name
from crc_runtime.errors import UserError


def _trt_unavailable() -> str | None:
    """Why the TensorRT build cannot run here, or None when it can."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'crc-fusion[trt]' on a machine with an NVIDIA GPU)"
    import tensorrt

    if not hasattr(tensorrt, "Builder"):
        return "the installed tensorrt is PyPI's placeholder without the builder"
    try:
        from crc_runtime.backends import cuda

        cuda.device_info(0)
    except UserError as exc:
        return f"no usable CUDA device: {exc}"
    return None


TRT_MISSING = _trt_unavailable()


@pytest.mark.parametrize(
    ("gpu", "cc", "version", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "9.0", "10.13.0.35", "nvidia-h100-80gb-hbm3_sm90_trt10.13.0.plan"),
        ("NVIDIA GeForce RTX 4090", "8.9", "11.0.0", "nvidia-geforce-rtx-4090_sm89_trt11.0.0.plan"),
        ("Tesla T4", "7.5", "10.8.0.43", "tesla-t4_sm75_trt10.8.0.plan"),
    ],
)
def test_engine_file_name(gpu, cc, version, expected):
    assert engine_file_name(gpu, cc, version) == expected


def test_profile_must_be_ordered():
    TrtConfig(min_batch=1, opt_batch=1, max_batch=1).validate()
    with pytest.raises(UserError, match="min <= opt <= max"):
        TrtConfig(min_batch=8, opt_batch=4, max_batch=16).validate()
    with pytest.raises(UserError, match="workspace"):
        TrtConfig(workspace_mib=0).validate()


class _RecordingBuilder:
    """Stands in for ``trt.Builder``: records what crc-export asks of the builder config and profiles."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def create_builder_config(self):
        calls = self.calls

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def set_flag(self, flag):
                calls.append(("set", flag))

            def clear_flag(self, flag):
                calls.append(("clear", flag))

            def add_optimization_profile(self, profile):
                calls.append(("profile", dict(profile.shapes)))
                return 0

        return Config()

    def create_optimization_profile(self):
        class Profile:
            shapes: dict = {}

            def set_shape(self, name, min_shape, opt_shape, max_shape):
                self.shapes = {**self.shapes, name: (min_shape, opt_shape, max_shape)}

        return Profile()


@pytest.mark.parametrize("has_tf32_flag", [True, False])
def test_builder_config_turns_tf32_off_and_holds_one_profile(has_tf32_flag):
    """TensorRT enables TF32 for FP32 layers by default; crc-export's engines keep FP32 layers FP32."""
    flags = SimpleNamespace(TF32="TF32") if has_tf32_flag else SimpleNamespace()  # detected with hasattr
    trt = SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), BuilderFlag=flags)
    builder = _RecordingBuilder()
    shapes = _profile_shapes({"pathology": (28, 28, 3), "radiology": (28, 28, 1)}, TrtConfig(opt_batch=16))
    builder_config(trt, builder, shapes, 1024)
    assert ("pool", "workspace", 1024 << 20) in builder.calls
    assert [c for c in builder.calls if c[0] in ("set", "clear")] == (
        [("clear", "TF32")] if has_tf32_flag else []
    )
    (profile,) = [c[1] for c in builder.calls if c[0] == "profile"]
    assert profile["pathology"] == ([1, 28, 28, 3], [16, 28, 28, 3], [256, 28, 28, 3])
    assert profile["radiology"] == ([1, 28, 28, 1], [16, 28, 28, 1], [256, 28, 28, 1])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_trt_without_tensorrt_is_one_line_naming_the_extra(tiny_run, tmp_path):
    result = CliRunner().invoke(export_command, [str(tiny_run), "-o", str(tmp_path / "b"), "--trt"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --trt needs tensorrt")
    assert "pip install 'crc-fusion[trt]'" in lines[0]
    assert not (tmp_path / "b").exists()  # refused before any export work


def test_impossible_trt_requests_are_refused_before_export(tmp_path):
    """Checked before the run is even read: the run folder here does not exist."""
    base = [str(tmp_path / "run"), "-o", str(tmp_path / "b"), "--trt"]
    result = CliRunner().invoke(export_command, [*base, "--min-batch", "64", "--opt-batch", "8"])
    assert result.exit_code == 1 and "min <= opt <= max" in result.output
    result = CliRunner().invoke(export_command, [*base, "--no-fp16"])
    assert result.exit_code == 1 and "model.fp16.onnx; drop --no-fp16" in result.output
    assert not (tmp_path / "b").exists()


def test_bad_threshold_flag_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(
        export_command, [str(tmp_path / "run"), "-o", str(tmp_path / "b"), "--threshold", "fp16.top1=0.9"]
    )
    assert result.exit_code == 2 and "PRECISION.KEY=VALUE" in result.output


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(TRT_MISSING is not None, reason=str(TRT_MISSING))
def test_engine_build_parity_and_timing_cache_reuse(tiny_run, tmp_path):
    bundle, triton = tmp_path / "bundle", tmp_path / "triton"
    args = [
        str(tiny_run),
        "-o",
        str(bundle),
        "--parity-pairs",
        "32",
        "--trt",
        "--opt-batch",
        "16",
        "--max-batch",
        "64",
        "--workspace",
        "1024",
        "--triton",
        str(triton),
    ]
    first = CliRunner().invoke(export_command, args)
    assert first.exit_code == 0, first.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    (engine,) = [a for a in manifest["artifacts"] if a["kind"] == "tensorrt"]
    record = engine["engine"]
    assert engine["file"] == engine_file_name(
        record["gpu_name"], record["compute_capability"], record["tensorrt_version"]
    )
    assert engine["usable"] is True and engine["parity"]["passed"] is True
    assert engine["parity"]["top1_agreement"] >= 0.995
    assert record["strongly_typed"] is True and record["source"] == "model.fp16.onnx"
    assert record["tf32"] is False
    profile = record["profile"]
    assert [profile["min_batch"], profile["opt_batch"], profile["max_batch"]] == [1, 16, 64]
    assert profile["shapes"]["pathology"] == {
        "min": [1, 28, 28, 3],
        "opt": [16, 28, 28, 3],
        "max": [64, 28, 28, 3],
    }
    assert record["timing_cache_seeded"] is False
    assert engine["file"] in manifest["files"] and engine["timing_cache"] in manifest["files"]
    assert (triton / "crc_fusion_trt" / "1" / "model.plan").read_bytes() == (
        bundle / engine["file"]
    ).read_bytes()

    again = CliRunner().invoke(export_command, [*args, "--overwrite"])
    assert again.exit_code == 0, again.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    (engine,) = [a for a in manifest["artifacts"] if a["kind"] == "tensorrt"]
    assert engine["engine"]["timing_cache_seeded"] is True  # the first bundle's cache was reused


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(TRT_MISSING is not None, reason=str(TRT_MISSING))
def test_parser_errors_name_the_node(tmp_path):
    """An ONNX op TensorRT has no importer for: one line per error, naming the node."""
    import onnx
    from crc_export.tensorrt import EngineBuildError, build_engine
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery_node", domain="crc.test")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("crc.test", 1)]
    )
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(EngineBuildError) as info:
        build_engine(path, tmp_path, {"x": (4,)}, TrtConfig(max_batch=4, opt_batch=2))
    assert info.value.details and all(line.startswith("bad.onnx: node 0") for line in info.value.details)
    # TensorRT 10+ (the only releases with strongly typed networks) report the node's name.
    assert any("mystery_node" in line for line in info.value.details)
