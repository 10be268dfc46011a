"""crc-export --int8: a QDQ model calibrated on training pairs only, FP32 where it must be, gated, refused
when damaged; and the INT8 TensorRT engine build, checked against a fake tensorrt module (no GPU here).
"""

from __future__ import annotations

import hashlib
import json
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from crc_export import int8 as int8_module
from crc_export.cli import export_command
from crc_export.int8 import INT8_FILE, INT8_TRT_FILE, fp32_regions, int8_summary
from crc_runtime.bundle import load_bundle, sha256_file
from crc_runtime.errors import BundleError
from crc_runtime.validate import DEFAULT_THRESHOLDS

CALIBRATION_PAIRS = 24


def _manifest(bundle):
    return json.loads((bundle / "manifest.json").read_text())


def _int8_entry(manifest):
    (entry,) = [a for a in manifest["artifacts"] if a["file"] == INT8_FILE]
    return entry


def _digests(images: np.ndarray) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images}


@pytest.fixture(scope="module")
def int8_export(tiny_run, tmp_path_factory):
    """``crc-export --int8 --no-fp16`` through the CLI, with every calibration batch recorded.

    Returns:
        (bundle, CLI output, the calibration batches quantize_static was fed).
    """
    fed = []

    class RecordingReader(int8_module.PairReader):
        def get_next(self):
            batch = super().get_next()
            if batch is not None:
                fed.append(batch)
            return batch

    root = tmp_path_factory.mktemp("int8")
    bundle = root / "bundle"
    args = [str(tiny_run), "-o", str(bundle), "--parity-pairs", "32", "--no-fp16", "--no-explain", "--int8"]
    args += ["--triton", str(root / "triton")]
    args += ["--int8-calibration-pairs", str(CALIBRATION_PAIRS), "--threshold", "int8.min_cosine=0.9"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8_module, "PairReader", RecordingReader)
        result = CliRunner().invoke(export_command, args)
    assert result.exit_code == 0, result.output
    return bundle, result.output, fed


def test_int8_artifact_is_gated_and_recorded(int8_export):
    bundle, output, _ = int8_export
    manifest = _manifest(bundle)
    assert manifest["files"][INT8_FILE] == sha256_file(bundle / INT8_FILE)
    entry = _int8_entry(manifest)
    assert entry["kind"] == "onnx" and entry["precision"] == "int8" and entry["usable"] is True
    assert "external_data" not in entry  # one self-contained file
    parity = entry["parity"]
    assert parity["passed"] is True and parity["backend"] == "ort-cpu" and parity["pairs"] == 32
    assert parity["thresholds"] == {**DEFAULT_THRESHOLDS["int8"], "min_cosine": 0.9}  # the --threshold
    assert parity["top1_agreement"] >= 0.99
    assert 0 < parity["max_abs_diff"]  # INT8 is not FP32
    quant = entry["quantization"]
    assert quant["file"] == INT8_FILE and quant["format"] == "QDQ" and quant["reduce_range"] is False
    assert quant["activations"].startswith("uint8, asymmetric") and "per output channel" in quant["weights"]
    assert "tensorrt" not in quant and not (bundle / INT8_TRT_FILE).exists()  # only with --trt
    calibration = quant["calibration"]
    assert calibration["split"] == "train" and calibration["method"] == "percentile"
    assert calibration["pairs"] == calibration["requested_pairs"] == CALIBRATION_PAIRS
    assert "64 training pairs, seed 0" in calibration["selection"]  # tiny_run keeps 64 training pairs
    assert "model.int8.onnx" in output and output.strip().splitlines()[-1] == "PASSED"
    assert "histogram" not in output  # onnxruntime's calibrators print(); crc-export logs that instead
    # Triton gets it as its own model, the one file as it is.
    triton = bundle.parent / "triton" / "crc_fusion_int8_onnx"
    assert (triton / "1" / "model.onnx").read_bytes() == (bundle / INT8_FILE).read_bytes()
    assert 'platform: "onnxruntime_onnx"' in (triton / "config.pbtxt").read_text()
    # The runtime accepts it, and the CPU picks it.
    loaded = load_bundle(bundle)
    assert loaded.artifact("int8")["file"] == INT8_FILE
    # INT8 weights: the file is far smaller than the FP32 weights.
    assert (bundle / INT8_FILE).stat().st_size < (bundle / "model.onnx.data").stat().st_size / 3


def test_qdq_graph_quantizes_every_conv_and_keeps_softmax_head_preprocessing_fp32(int8_export):
    bundle, _, _ = int8_export
    summary = int8_summary(bundle / INT8_FILE)
    assert summary == _int8_entry(_manifest(bundle))["quantization"]["graph"]
    # resnet18 x 2 branches = 40 convs; the two attention blocks have 8 1x1 convs each: all INT8.
    assert summary["conv_total"] == 56 and summary["conv_int8"] == 56
    assert summary["softmax_total"] == 4 and summary["softmax_fp32"] == 4
    assert summary["matmul_total"] == 8 and summary["matmul_fp32"] == 8
    assert summary["gemm_total"] == 1 and summary["gemm_fp32"] == 1
    graph = onnx.load(str(bundle / INT8_FILE)).graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Softmax: FP32 in and out, its scores not quantized on the way in.
    for node in graph.node:
        if node.op_type == "Softmax":
            assert producers[node.input[0]].op_type not in ("DequantizeLinear", "QuantizeLinear")
    # The head: an FP32 weight matrix, FP32 input (the pooled features are never quantized).
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]
    weights = {t.name: t for t in graph.initializer}
    assert weights[gemm.input[1]].data_type == onnx.TensorProto.FLOAT
    # Preprocessing: the uint8 inputs are cast and z-scored in FP32; the only quantization in that region
    # is the input of the first convolutions (a QuantizeLinear -> DequantizeLinear -> Conv chain).
    pre = set(fp32_regions(onnx.load(str(bundle / INT8_FILE), load_external_data=False))["preprocessing"])
    pre_nodes = [n for n in graph.node if n.name in pre]
    assert {"Cast", "Div", "Sub"} <= {n.op_type for n in pre_nodes}
    for node in pre_nodes:
        if node.op_type == "QuantizeLinear":
            (dq,) = consumers[node.output[0]]
            assert dq.op_type == "DequantizeLinear"
            assert {c.op_type for c in consumers[dq.output[0]]} == {"Conv"}
        else:
            assert node.op_type != "DequantizeLinear" or all(
                c.op_type == "Conv" for c in consumers[node.output[0]]
            )
    for name in ("pathology", "radiology"):
        assert {c.op_type for c in consumers[name]} <= {"Cast", "Shape"}


def test_tensorrt_encoding_is_symmetric_int8(int8_export, tiny_run, tmp_path):
    """model.int8.trt.onnx: every Q/DQ zero point an int8 0 (TensorRT's rule); the CPU file: uint8."""
    from crc_export.int8 import Int8Config, quantize_model

    bundle, _, fed = int8_export
    pathology = np.concatenate([batch["pathology"] for batch in fed])[:8]
    radiology = np.concatenate([batch["radiology"] for batch in fed])[:8]
    cpu, trt = tmp_path / INT8_FILE, tmp_path / INT8_TRT_FILE
    record = quantize_model(
        bundle / "model.onnx", cpu, pathology, radiology, Int8Config(calibration_pairs=8), trt_path=trt
    )
    assert record["tensorrt"]["file"] == INT8_TRT_FILE
    assert record["tensorrt"]["activations"].startswith("int8, symmetric (zero point 0)")
    assert record["tensorrt"]["graph"]["conv_int8"] == record["tensorrt"]["graph"]["conv_total"] == 56

    def zero_points(path):
        graph = onnx.load(str(path)).graph
        inits = {t.name: t for t in graph.initializer}
        qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        return [inits[n.input[2]] for n in qdq if len(n.input) > 2 and n.input[2] in inits]

    trt_points = zero_points(trt)
    assert trt_points and all(t.data_type != onnx.TensorProto.UINT8 for t in trt_points)
    assert all(
        not onnx.numpy_helper.to_array(t).any() for t in trt_points if t.data_type == onnx.TensorProto.INT8
    )
    assert any(t.data_type == onnx.TensorProto.UINT8 for t in zero_points(cpu))


def test_calibration_never_touches_reference_pairs(int8_export, tiny_run):
    from crc_train.data import DataConfig, load_split

    bundle, _, fed = int8_export
    pathology = np.concatenate([batch["pathology"] for batch in fed])
    radiology = np.concatenate([batch["radiology"] for batch in fed])
    # quantize_static may read the reader more than once; the distinct pairs are the calibration set.
    assert len(_digests(pathology)) == CALIBRATION_PAIRS
    data = DataConfig(**json.loads((tiny_run / "config.json").read_text())["data"])
    train = load_split(data, "train")
    ref = load_bundle(bundle).load_reference()
    assert _digests(pathology) <= _digests(train.pathology)
    assert _digests(radiology) <= _digests(train.radiology)
    assert not _digests(pathology) & _digests(ref["pathology"])
    assert not _digests(radiology) & _digests(ref["radiology"])


def test_broken_int8_fails_the_gate_and_is_refused(tiny_run, tmp_path, monkeypatch):
    """Damaged weight scales: FAILED, exit 1, unusable with reasons, refused by crc-infer.

    The damage flips the sign of every weight scale (x -4): the tiny run predicts one class for every
    pair, so a damage must move that argmax to be visible to a top-1 gate (scales x 100 alone keep it:
    cosine 0.92, agreement still 100 %). tests/runtime/test_rt_int8.py breaks a model whose argmax
    varies with scales x 100.
    """
    import crc_export.build as build
    from crc_runtime.cli import cli as infer_cli

    real_quantize = build.quantize_model

    def quantize_then_break(fp32_path, out_path, *args, **kwargs):
        record = real_quantize(fp32_path, out_path, *args, **kwargs)
        proto = onnx.load(str(out_path))
        weights = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and t.dims}
        scales = {
            n.input[1] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
        }
        for tensor in proto.graph.initializer:
            if tensor.name in scales:
                damaged = onnx.numpy_helper.to_array(tensor) * -4
                tensor.CopyFrom(onnx.numpy_helper.from_array(damaged, tensor.name))
        onnx.save(proto, str(out_path))
        return record

    monkeypatch.setattr(build, "quantize_model", quantize_then_break)
    out = tmp_path / "broken"
    args = [str(tiny_run), "-o", str(out), "--parity-pairs", "32", "--no-fp16", "--no-explain", "--int8"]
    result = CliRunner().invoke(export_command, [*args, "--int8-calibration-pairs", "8"])
    assert result.exit_code == 1, result.output
    assert "FAILED: model.int8.onnx" in result.output
    fp32, int8 = _manifest(out)["artifacts"]
    assert fp32["usable"] is True
    assert int8["usable"] is False and int8["parity"]["passed"] is False
    assert any(r.startswith("int8 top1_agreement") for r in int8["parity"]["reasons"])
    with pytest.raises(BundleError, match="model.int8.onnx: marked unusable"):
        load_bundle(out).artifact("int8")
    refused = CliRunner().invoke(infer_cli, ["bench", "--bundle", str(out), "--artifact", "int8"])
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "marked unusable in manifest.json (int8 top1_agreement" in refused.output
    shown = CliRunner().invoke(infer_cli, ["validate", str(out)])
    assert shown.exit_code == 0, shown.output  # FP32 ran and passed; INT8 skipped with the reason
    assert "marked unusable by crc-export: int8 top1_agreement" in shown.output


def test_bad_int8_threshold_flag_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(
        export_command,
        [str(tmp_path / "run"), "-o", str(tmp_path / "b"), "--threshold", "int4.max_abs_diff=1"],
    )
    assert result.exit_code == 2 and "'int4.max_abs_diff=1'" in result.output and "int8" in result.output


# --- TensorRT: the INT8 engine build, against a fake tensorrt module --------------------------------


def fake_tensorrt(version: str, fp16_flag: bool):
    """The part of the tensorrt API build_engine touches, recording what it is asked to do.

    ``fp16_flag`` False mimics TensorRT 11 (no precision builder flags; STRONGLY_TYPED kept).
    """
    calls = types.SimpleNamespace(network_flags=None, parsed=None, builder_flags=[], profiles=[])

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class Config:
        def set_memory_pool_limit(self, pool, size):
            calls.workspace = size

        def set_flag(self, flag):
            calls.builder_flags.append(flag)

        def add_optimization_profile(self, profile):
            calls.profiles.append(profile.shapes)

        def create_timing_cache(self, data):
            return types.SimpleNamespace(serialize=lambda: b"cache")

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.network_flags = flags
            return object()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            calls.parsed = path
            return True

    flags = {"INT8": 2, **({"FP16": 1} if fp16_flag else {})}
    trt = types.SimpleNamespace(
        __version__=version,
        ILogger=ILogger,
        Builder=Builder,
        OnnxParser=OnnxParser,
        NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=5),
        BuilderFlag=types.SimpleNamespace(**flags),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
    )
    return trt, calls


@pytest.mark.parametrize(("version", "fp16_flag"), [("10.13.0.35", True), ("11.0.0.1", False)])
def test_int8_engine_is_strongly_typed_with_no_precision_flags(tmp_path, monkeypatch, version, fp16_flag):
    from crc_export import tensorrt as trt_module
    from crc_export.tensorrt import TrtConfig, build_engine
    from crc_runtime.backends import cuda

    trt, calls = fake_tensorrt(version, fp16_flag)
    monkeypatch.setattr(trt_module, "_import_tensorrt", lambda: trt)
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda_runtime": "13.0"}
    monkeypatch.setattr(cuda, "device_info", lambda device=0: gpu)
    monkeypatch.setattr(cuda, "cudart", lambda: types.SimpleNamespace(cudaSetDevice=lambda d: (0,)))
    monkeypatch.setattr(cuda, "check", lambda result, what="": result)
    source = tmp_path / INT8_TRT_FILE
    source.write_bytes(b"qdq")
    cfg = TrtConfig(min_batch=1, opt_batch=8, max_batch=32, workspace_mib=64)
    built = build_engine(source, tmp_path, {"pathology": (28, 28, 3)}, cfg, precision="int8")
    # Explicit quantization the TensorRT 10/11 way: a strongly typed network, no INT8 or FP16 flag.
    assert calls.network_flags == 1 << 5
    assert calls.builder_flags == []
    assert calls.parsed == str(source)
    assert calls.profiles == [{"pathology": ([1, 28, 28, 3], [8, 28, 28, 3], [32, 28, 28, 3])}]
    release = ".".join(version.split(".")[:3])
    assert built["file"] == f"nvidia-h100-80gb-hbm3_sm90_trt{release}.int8.plan"
    assert built["timing_cache"] == f"nvidia-h100-80gb-hbm3_sm90_trt{release}.int8.timing.cache"
    assert (tmp_path / built["file"]).read_bytes() == b"engine"
    assert built["engine"]["source"] == INT8_TRT_FILE and built["engine"]["strongly_typed"] is True


def test_int8_engine_artifact_is_gated_on_int8_thresholds(tmp_path, monkeypatch):
    """--trt --int8: the engine is built from model.int8.trt.onnx and gated with the INT8 thresholds."""
    import crc_export.build as build
    from crc_export.build import ExportConfig
    from crc_export.tensorrt import TrtConfig

    seen = {}

    def fake_build_engine(source, out_dir, shapes, cfg, previous_dir=None, precision="fp16"):
        seen.update(source=source.name, precision=precision)
        return {
            "file": "x.int8.plan",
            "timing_cache": "x.int8.timing.cache",
            "engine": {"source": source.name},
        }

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(100, 9)).astype(np.float32)
    ref = {"logits": logits, "labels": logits.argmax(1)}
    off = logits.copy()
    off[:2] = np.roll(off[:2], 1, axis=1)  # 2 of 100 argmaxes move: 98 % agreement < 99 %
    monkeypatch.setattr(build, "build_engine", fake_build_engine)
    monkeypatch.setattr(build, "engine_logits", lambda *a, **k: off)
    cfg = ExportConfig(trt=TrtConfig())
    art = build._engine_artifact(tmp_path / INT8_TRT_FILE, "int8", tmp_path, 28, ref, cfg, None)
    assert seen == {"source": INT8_TRT_FILE, "precision": "int8"}
    assert art["kind"] == "tensorrt" and art["precision"] == "int8"
    assert art["parity"]["thresholds"] == DEFAULT_THRESHOLDS["int8"]
    assert art["usable"] is False and art["parity"]["top1_agreement"] == pytest.approx(0.98)
    monkeypatch.setattr(build, "engine_logits", lambda *a, **k: logits)
    art = build._engine_artifact(tmp_path / INT8_TRT_FILE, "int8", tmp_path, 28, ref, cfg, None)
    assert art["usable"] is True


def test_trt_int8_export_lists_the_symmetric_source_and_gates_the_engine(tiny_run, tmp_path, monkeypatch):
    """crc-export --trt --int8 end to end with TensorRT stood in for: the engine is built from
    model.int8.trt.onnx (listed in files), carries its quantization record and is gated on the INT8
    thresholds; the stand-in "engine" runs its source ONNX with onnxruntime, so the symmetric encoding's
    own parity is what the gate sees.
    """
    import crc_export.build as build
    from crc_export.build import ExportConfig, build_bundle
    from crc_export.int8 import Int8Config
    from crc_export.tensorrt import TrtConfig
    from crc_runtime.backends.onnxruntime import OrtBackend
    from crc_runtime.validate import run_reference

    def fake_build_engine(source, out_dir, shapes, cfg, previous_dir=None, precision="fp16"):
        name = f"fake-gpu_sm90_trt10.13.0{'' if precision == 'fp16' else '.' + precision}"
        (out_dir / f"{name}.plan").write_bytes(b"engine")
        (out_dir / f"{name}.timing.cache").write_bytes(b"cache")
        record = {"gpu_name": "Fake GPU", "compute_capability": "9.0", "tensorrt_version": "10.13.0.35"}
        return {
            "file": f"{name}.plan",
            "timing_cache": f"{name}.timing.cache",
            "engine": {**record, "source": source.name},
        }

    def fake_engine_logits(engine_path, record, ref, batch_size, device=0, precision="fp16"):
        with OrtBackend(engine_path.parent / record["source"], "cpu", precision=precision) as backend:
            return run_reference(backend, ref, batch_size)

    monkeypatch.setattr(build, "require_tensorrt", lambda: None)
    monkeypatch.setattr(build, "build_engine", fake_build_engine)
    monkeypatch.setattr(build, "engine_logits", fake_engine_logits)
    cfg = ExportConfig(parity_pairs=16, explain=False, int8=Int8Config(calibration_pairs=8), trt=TrtConfig())
    result = build_bundle(tiny_run, tmp_path / "bundle", cfg)
    assert result.passed
    manifest = result.manifest
    kinds = [(a["kind"], a["precision"]) for a in manifest["artifacts"]]
    assert kinds == [
        ("onnx", "fp32"),
        ("onnx", "fp16"),
        ("onnx", "int8"),
        ("tensorrt", "fp16"),
        ("tensorrt", "int8"),
    ]
    engine = manifest["artifacts"][-1]
    assert engine["file"].endswith(".int8.plan") and engine["engine"]["source"] == INT8_TRT_FILE
    assert manifest["files"][INT8_TRT_FILE] == sha256_file(tmp_path / "bundle" / INT8_TRT_FILE)
    assert engine["quantization"]["file"] == INT8_TRT_FILE
    assert engine["quantization"]["activations"].startswith("int8, symmetric (zero point 0)")
    assert engine["quantization"]["calibration"]["split"] == "train"
    assert engine["parity"]["thresholds"] == DEFAULT_THRESHOLDS["int8"] and engine["usable"] is True
    # The onnxruntime model keeps its uint8 encoding; the engine's record is not mixed into it.
    (onnx_int8,) = [a for a in manifest["artifacts"] if a["file"] == INT8_FILE]
    assert "tensorrt" not in onnx_int8["quantization"]
    assert onnx_int8["quantization"]["activations"].startswith("uint8")
