"""The latency report: statistics, per-pair and per-stage sections, JSON on disk, and ``crc-infer bench``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.backends.base import TensorSpec
from crc_runtime.backends.onnxruntime import OrtBackend
from crc_runtime.bench import format_bench_table, parse_batch_sizes, run_bench, synthetic_inputs
from crc_runtime.cli import cli
from crc_runtime.errors import UserError
from crc_runtime.timing import format_latency_table, latency_section, write_report


def test_latency_section_per_pair_and_stages():
    # Two full batches of 4 and a last batch of 2 pairs: per-pair time divides by each batch's own size.
    section = latency_section([0.008, 0.012, 0.002], [4, 4, 2], {"h2d_ms": [1.0, 2.0, 3.0]})
    assert section["per_batch"]["count"] == 3
    assert section["per_batch"]["median_ms"] == pytest.approx(8.0)
    assert section["per_pair"]["max_ms"] == pytest.approx(3.0)  # 12 ms / 4
    assert section["per_pair"]["min_ms"] == pytest.approx(1.0)  # 2 ms / 2
    assert section["h2d"]["mean_ms"] == pytest.approx(2.0) and section["h2d"]["count"] == 3
    table = format_latency_table(section)
    assert table.splitlines()[0].split() == ["min", "mean", "p50", "p90", "p95", "p99", "max"]
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["batch", "pair", "h2d"]


def test_report_is_strict_json_written_atomically(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    write_report(path, {"latency": latency_section([], []), "x": [float("inf"), 1.5]})
    data = json.loads(path.read_text())  # json.loads would accept NaN; check it is not there at all
    assert "NaN" not in path.read_text() and data["latency"]["per_batch"]["min_ms"] is None
    assert data["x"] == [None, 1.5]
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_parse_batch_sizes_and_synthetic_inputs():
    assert parse_batch_sizes("1,8, 32") == [1, 8, 32]
    for bad in ("", "0", "a,b", "4,-1"):
        with pytest.raises(UserError, match="--batch-sizes"):
            parse_batch_sizes(bad)
    specs = [TensorSpec("pathology", "uint8", ("batch", 8, 8, 3)), TensorSpec("x", "float32", (None, 2))]
    a, b = synthetic_inputs(specs, 5), synthetic_inputs(specs, 5)
    assert a["pathology"].shape == (5, 8, 8, 3) and a["pathology"].dtype == np.uint8
    assert a["pathology"].max() > 200 and a["pathology"].min() < 50  # the whole uint8 range is used
    np.testing.assert_array_equal(a["pathology"], b["pathology"])  # same seed, same bytes
    with pytest.raises(UserError, match="only the batch dimension"):
        synthetic_inputs([TensorSpec("y", "uint8", (None, "h", 3))], 2)


def test_run_bench_rows_and_profile_limit(tiny):
    with OrtBackend(tiny.bundle / "model.onnx", intra_op_threads=1) as backend:
        rows = run_bench(backend, [1, 4], warmup_iters=1, iterations=3)
        backend.max_batch = 2  # what a TensorRT engine's profile says; larger sizes get a skipped row
        limited = run_bench(backend, [2, 4], warmup_iters=0, iterations=2)
    assert [r["batch_size"] for r in rows] == [1, 4]
    for r in rows:
        assert r["iterations"] == 3 and r["warmup_iterations"] == 1
        lat = r["latency"]
        assert lat["per_batch"]["count"] == 3 and "compute" in lat
        assert lat["per_pair"]["median_ms"] == pytest.approx(lat["per_batch"]["median_ms"] / r["batch_size"])
        assert r["throughput_pairs_per_s"] > 0
    assert "skipped" not in limited[0] and "max batch 2" in limited[1]["skipped"]
    table = format_bench_table(rows + limited)
    assert "pairs/s" in table and "skipped: above the engine profile's max batch 2" in table


def test_bench_command_prints_table_and_writes_report(tiny, tmp_path):
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(
        cli,
        ["bench", "--bundle", str(tiny.bundle), "--backend", "ort-cpu", "--batch-sizes", "1,3",
         "--warmup-iters", "1", "--iterations", "2", "--threads", "1", "--report", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "backend: ort-cpu" in result.output and "synthetic uint8" in result.output
    data = json.loads(report.read_text())
    assert data["kind"] == "crc-infer bench" and data["backend"]["precision"] == "fp32"
    assert [r["batch_size"] for r in data["results"]] == [1, 3]
    versions = data["environment"]["versions"]
    assert versions.get("onnxruntime") or versions.get("onnxruntime-gpu")  # whichever distribution is here
    bad = CliRunner().invoke(cli, ["bench", "--bundle", str(tiny.bundle), "--batch-sizes", "x"])
    assert bad.exit_code == 1 and bad.output.startswith("error: --batch-sizes")


def test_run_report_fields(tiny, tmp_path):
    report = tmp_path / "run.json"
    out = tmp_path / "preds.csv"
    result = CliRunner().invoke(
        cli,
        [str(tiny.csv_dir), "--bundle", str(tiny.bundle), "--batch-size", "4", "--output", str(out),
         "--report", str(report), "--threads", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["kind"] == "crc-infer run" and data["batch_size"] == 4
    assert data["pairs"] == {"processed": 6, "skipped": 0, "resumed": 0}
    # Batches of 4 + 2: the first is the warm-up (predictions kept, time outside the latency figures).
    assert data["warmup"]["iterations"] == 1 and data["warmup"]["pairs"] == 4
    assert data["iterations"] == 1 and data["latency"]["per_batch"]["count"] == 1
    tp = data["throughput"]
    assert tp["engine_only_pairs_per_s"] >= tp["end_to_end_pairs_per_s"] > 0  # decode adds time
    calls_s = data["latency"]["per_batch"]["mean_ms"] / 1e3 + data["warmup"]["seconds"]
    assert math.isclose(tp["engine_seconds"], calls_s, rel_tol=1e-6)  # every model call counts once
    assert data["backend"]["name"] == "ort-cpu" and data["backend"]["selected_because"]
    for key in ("python", "versions", "cpu_count", "platform"):
        assert key in data["environment"]
    bad = CliRunner().invoke(
        cli,
        [
            str(tiny.csv_dir),
            "--bundle",
            str(tiny.bundle),
            "--output",
            str(out),
            "--report",
            str(tmp_path / "no" / "r.json"),
        ],
    )
    assert bad.exit_code == 1 and "--report" in bad.output
