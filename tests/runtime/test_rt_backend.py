"""The onnxruntime backend, parity metrics and gate, and latency statistics."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from crc_runtime.backends import cuda_provider, open_backend, open_onnx
from crc_runtime.backends.base import Backend, TensorSpec, check_inputs
from crc_runtime.backends.onnxruntime import OrtBackend, ProviderStartError
from crc_runtime.bundle import load_bundle
from crc_runtime.errors import BackendError, UserError
from crc_runtime.timing import format_latency, summarize, throughput
from crc_runtime.validate import (
    DEFAULT_THRESHOLDS,
    compare_logits,
    format_parity_table,
    gate,
    validate_bundle,
)


@pytest.fixture
def backend(tiny):
    with OrtBackend(tiny.bundle / "model.onnx", device="cpu", intra_op_threads=1) as b:
        yield b


def test_ort_matches_numpy(tiny, backend):
    assert isinstance(backend, Backend)
    assert backend.name == "ort-cpu" and backend.precision == "fp32"
    ref = load_bundle(tiny.bundle).load_reference()
    for n in (1, 7, 20):  # dynamic batch
        out = backend.infer({"pathology": ref["pathology"][:n], "radiology": ref["radiology"][:n]})
        assert list(out) == ["logits"]
        assert out["logits"].dtype == np.float32 and out["logits"].shape == (n, 9)
        np.testing.assert_allclose(
            out["logits"], tiny.logits(ref["pathology"][:n], ref["radiology"][:n]), rtol=1e-5, atol=1e-5
        )


def test_input_specs_from_session(backend):
    specs = {s.name: s for s in backend.input_specs}
    assert specs["pathology"].dtype == "uint8" and specs["pathology"].shape == ("batch", 8, 8, 3)
    assert specs["radiology"].shape == ("batch", 8, 8, 1)


def test_check_inputs_before_running(backend):
    good = {"pathology": np.zeros((2, 8, 8, 3), np.uint8), "radiology": np.zeros((2, 8, 8, 1), np.uint8)}
    bad_cases = {
        "missing": {"pathology": good["pathology"]},
        "dtype float32": {**good, "pathology": good["pathology"].astype(np.float32)},
        "axis 2 is 7": {**good, "pathology": np.zeros((2, 8, 7, 3), np.uint8)},
        "rank": {**good, "radiology": np.zeros((2, 8, 8), np.uint8)},
        "batch size": {**good, "radiology": np.zeros((3, 8, 8, 1), np.uint8)},
    }
    for what, inputs in bad_cases.items():
        with pytest.raises(BackendError) as exc:
            backend.infer(inputs)
        assert "\n" not in str(exc.value), what
    check_inputs([TensorSpec("x", "uint8", (None, 2))], {"x": np.zeros((5, 2), np.uint8)})


def test_cuda_on_cpu_only_onnxruntime_is_loud(tiny):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(UserError) as exc:
        OrtBackend(tiny.bundle / "model.onnx", device="cuda").activate()
    msg = str(exc.value)
    assert "CUDAExecutionProvider" in msg and "CPUExecutionProvider" in msg and "available providers" in msg
    assert not cuda_provider()


@pytest.fixture
def cuda_listed_but_dead(monkeypatch, cuda_ep):
    """onnxruntime-gpu on a machine where CUDA cannot start: the provider is listed, sessions get the CPU.

    With onnxruntime-gpu and no usable GPU that is the real situation. With the CPU-only onnxruntime,
    listing CUDA as available reproduces it: asked for a provider it lacks, it warns and makes a CPU session.
    """
    if cuda_ep == "works":
        pytest.skip("onnxruntime's CUDA provider really works here")
    if cuda_ep == "absent":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        monkeypatch.setattr(ort, "get_available_providers", lambda: providers)


def test_named_cuda_that_cannot_start_is_loud(tiny, cuda_listed_but_dead):
    with pytest.raises(ProviderStartError) as exc:
        OrtBackend(tiny.bundle / "model.onnx", device="cuda").activate()
    msg = str(exc.value)
    assert "installed but did not start" in msg and "--device cpu" in msg and "\n" not in msg
    with pytest.raises(ProviderStartError):
        open_backend(load_bundle(tiny.bundle), "ort-cuda")
    with pytest.raises(ProviderStartError):  # --device cuda insists on a GPU even with auto
        open_backend(load_bundle(tiny.bundle), "auto", device="cuda")


def test_auto_falls_back_to_cpu_when_cuda_cannot_start(tiny, cuda_listed_but_dead):
    """The one fallback lives in crc_runtime.backends (open_backend / open_onnx), never in a backend."""
    with open_onnx(tiny.bundle / "model.onnx", device="auto", intra_op_threads=1) as backend:
        assert (backend.name, backend.device, backend.io_binding) == ("ort-cpu", "cpu", False)
        p = np.full((2, 8, 8, 3), 7, np.uint8)
        r = np.full((2, 8, 8, 1), 9, np.uint8)
        logits = backend.infer({"pathology": p, "radiology": r})["logits"]
        np.testing.assert_allclose(logits, tiny.logits(p, r), rtol=1e-5, atol=1e-4)
    selection = open_backend(load_bundle(tiny.bundle), "auto", intra_op_threads=1)
    try:
        assert selection.backend.name == "ort-cpu" and "did not start" in selection.reason
    finally:
        selection.backend.deactivate()
    (row,) = validate_bundle(load_bundle(tiny.bundle), device="auto", batch_size=8)
    assert row["passed"] is True and row["backend"] == "ort-cpu"


def test_corrupt_onnx_is_user_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x01garbage")
    with pytest.raises(BackendError, match="model.onnx"):
        OrtBackend(bad).activate()


def test_compare_logits_hand_made():
    ref = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]], np.float32)
    labels = np.array([0, 1, 2, 1])
    same = compare_logits(ref, labels, ref.copy())
    assert same["pairs"] == 4 and same["top1_agreement"] == 1.0
    assert same["reference_accuracy"] == same["accuracy"] == 0.75
    assert same["max_abs_diff"] == 0.0 and same["cosine"] == pytest.approx(1.0)
    assert gate(same, "fp32") == (True, [])

    out = ref.copy()
    out[3] = [0.0, 5.0, 0.0]  # flips row 3 to class 1 (now correct), moves it by 5
    m = compare_logits(ref, labels, out)
    assert m["top1_agreement"] == 0.75 and m["accuracy"] == 1.0
    assert m["max_abs_diff"] == 5.0 and m["mean_abs_diff"] == pytest.approx(6.0 / 12)
    assert m["cosine"] == pytest.approx(0.75)


def test_gate_fails_damaged_logits_and_says_what_would_pass():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 9)).astype(np.float32)
    labels = ref.argmax(1)
    damaged = ref + rng.normal(scale=0.5, size=ref.shape).astype(np.float32)
    metrics = compare_logits(ref, labels, damaged)
    passed, reasons = gate(metrics, "fp32")
    assert not passed and len(reasons) == 2
    assert any("top1_agreement" in r and "would pass with min_top1_agreement <=" in r for r in reasons)
    assert any(f"{metrics['max_abs_diff']:.6g}" in r and "1e-03" not in r and "0.001" in r for r in reasons)
    passed16, reasons16 = gate(metrics, "fp16")
    assert not passed16 and any("accuracy_delta" in r or "top1_agreement" in r for r in reasons16)
    assert gate(metrics, "fp32", {"min_top1_agreement": 0.0, "max_abs_diff": 10.0}) == (True, [])
    assert DEFAULT_THRESHOLDS["fp16"]["min_top1_agreement"] == 0.995


def test_validate_bundle_and_table(tiny):
    rows = validate_bundle(load_bundle(tiny.bundle))
    assert len(rows) == 1 and rows[0]["passed"] is True and rows[0]["backend"] == "ort-cpu"
    assert rows[0]["top1_agreement"] == 1.0 and rows[0]["reference_accuracy"] == pytest.approx(0.8)
    table = format_parity_table(rows)
    header = table.splitlines()[0]
    for column in (
        "artifact",
        "backend",
        "precision",
        "pairs",
        "top-1 agreement",
        "ref acc",
        "acc",
        "max |diff|",
        "mean |diff|",
        "cosine",
        "result",
    ):
        assert column in header
    assert "model.onnx" in table and "PASS" in table


def test_summarize_known_numbers():
    s = summarize([0.001, 0.002, 0.003, 0.004, 0.010])
    assert s["count"] == 5
    assert s["min_ms"] == pytest.approx(1.0) and s["max_ms"] == pytest.approx(10.0)
    assert s["mean_ms"] == pytest.approx(4.0) and s["median_ms"] == pytest.approx(3.0)
    assert s["p90_ms"] == pytest.approx(7.6) and s["p95_ms"] == pytest.approx(8.8)
    assert s["p99_ms"] == pytest.approx(9.76)
    assert throughput(100, 2.0) == 50.0
    assert format_latency(s) == "p50 3.00 ms  p95 8.80 ms  p99 9.76 ms"
    assert summarize([])["count"] == 0
