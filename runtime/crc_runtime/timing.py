"""Latency statistics and reports the way trtexec gives them.

min / mean / median / p90 / p95 / p99 / max in ms, per batch and per pair, and per stage (H2D / compute
/ D2H) when the backend times them; the environment that produced the numbers; atomic JSON reports.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .backends.base import Backend
    from .predict import InferenceResult
    from .predictor import Predictor

log = logging.getLogger(__name__)

PERCENTILES = {"median_ms": 50, "p90_ms": 90, "p95_ms": 95, "p99_ms": 99}


def summarize(seconds: list[float]) -> dict:
    """Summary of timings given in seconds.

    Percentiles use numpy's default linear interpolation between the closest ranks.

    Returns:
        count, min_ms, mean_ms, median_ms, p90_ms, p95_ms, p99_ms, max_ms (NaN when empty).
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        nan = float("nan")
        return {"count": 0, "min_ms": nan, "mean_ms": nan, **dict.fromkeys(PERCENTILES, nan), "max_ms": nan}
    return {
        "count": int(ms.size),
        "min_ms": float(ms.min()),
        "mean_ms": float(ms.mean()),
        **{key: float(np.percentile(ms, q)) for key, q in PERCENTILES.items()},
        "max_ms": float(ms.max()),
    }


def throughput(pairs: int, seconds: float) -> float:
    """Pairs per second (NaN for a zero or negative duration)."""
    return pairs / seconds if seconds > 0 else float("nan")


def format_latency(summary: dict, keys: tuple[str, ...] = ("median_ms", "p95_ms", "p99_ms")) -> str:
    """``p50 1.23 ms  p95 1.50 ms  p99 1.70 ms`` from a :func:`summarize` dict."""
    names = {"median_ms": "p50", "mean_ms": "mean", "min_ms": "min", "max_ms": "max"}
    return "  ".join(f"{names.get(k, k.removesuffix('_ms'))} {summary[k]:.2f} ms" for k in keys)


STAGES = ("h2d_ms", "compute_ms", "d2h_ms")


def latency_section(batch_seconds: list[float], batch_pairs: list[int], stage_ms: dict | None = None) -> dict:
    """Per-batch and per-pair latency summaries, plus per-stage ones (H2D / compute / D2H) when timed.

    Args:
        batch_seconds: Wall time of each timed model call.
        batch_pairs: Pairs in each of those calls (the last batch of a folder may be smaller).
        stage_ms: Stage name -> milliseconds per call, as backends report them in ``last_timings``.
    """
    pairs = np.asarray(batch_pairs, dtype=np.float64)
    section = {
        "per_batch": summarize(batch_seconds),
        "per_pair": summarize(list(np.asarray(batch_seconds, dtype=np.float64) / np.maximum(pairs, 1))),
    }
    for stage, values in (stage_ms or {}).items():
        section[stage.removesuffix("_ms")] = summarize([v / 1e3 for v in values])
    return section


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(backend: Backend | None = None) -> dict:
    """Host, library versions and, for a GPU backend, the device that produced the numbers."""
    import platform

    env = {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {
            dist: v
            for dist in ("crc-fusion", "numpy", "Pillow", "onnxruntime", "onnxruntime-gpu", "tensorrt")
            + ("cuda-bindings",)
            if (v := _version(dist)) is not None
        },
    }
    if backend is not None and backend.device != "cpu":
        env["gpu"] = backend.device_info
    return env


def backend_section(backend: Backend, artifact: dict | None = None, reason: str | None = None) -> dict:
    """What ran: backend name and version, device, precision, artifact, why it was chosen."""
    return {
        "name": backend.name,
        "version": backend.version,
        "device": backend.device,
        "precision": backend.precision,
        "max_batch": backend.max_batch,
        "artifact": (artifact or {}).get("file"),
        "selected_because": reason,
        "stage_timing": backend.timing_method,
    }


def write_report(path: str | os.PathLike, report: dict) -> None:
    """Write a report as JSON atomically (NaN becomes null, so any JSON reader accepts it)."""
    from .atomic import atomic_write_text

    atomic_write_text(path, json.dumps(_finite(report), indent=2, sort_keys=True) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def format_stats_row(label: str, summary: dict) -> str:
    """``label  min mean p50 p90 p95 p99 max`` in ms, fixed width."""
    keys = ("min_ms", "mean_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")
    return f"{label:<10}" + "".join(f"{summary[k]:>10.3f}" for k in keys)


def format_latency_table(section: dict) -> str:
    """A trtexec-like block: one row per summary of :func:`latency_section` (ms)."""
    head = f"{'':<10}" + "".join(f"{h:>10}" for h in ("min", "mean", "p50", "p90", "p95", "p99", "max"))
    rows = [head]
    for key in ("per_batch", "per_pair", "h2d", "compute", "d2h"):
        if key in section and section[key]["count"]:
            rows.append(format_stats_row(key.replace("per_", ""), section[key]))
    return "\n".join(rows)


def folder_run_report(result: InferenceResult, predictor: Predictor) -> dict:
    """The latency report of a folder run (DESIGN.md "Latency report").

    Args:
        result: What :meth:`~crc_runtime.predictor.Predictor.predict_folder` returned.
        predictor: The predictor that ran it (backend, artifact, batch size, load time).
    """
    import time

    backend = predictor.backend
    engine_s = sum(result.batch_seconds) + result.warmup_seconds  # every model call: all pairs processed
    return {
        "kind": "crc-infer run",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(backend),
        "backend": backend_section(backend, predictor.artifact, predictor.reason),
        "batch_size": predictor.batch_size,
        "decode_workers": result.workers,
        "model_load_seconds": predictor.load_seconds,
        # The first batch is the warm-up: its predictions are kept, its time is outside "latency".
        "warmup": {
            "iterations": 1 if result.warmup_pairs else 0,
            "pairs": result.warmup_pairs,
            "seconds": result.warmup_seconds,
        },
        "iterations": len(result.batch_seconds),
        "pairs": {"processed": result.processed, "skipped": len(result.skipped), "resumed": result.resumed},
        "latency": latency_section(result.batch_seconds, result.batch_pairs, result.stage_ms),
        "throughput": {
            "end_to_end_pairs_per_s": throughput(result.processed, result.total_seconds),
            "engine_only_pairs_per_s": throughput(result.processed, engine_s),
            "end_to_end_seconds": result.total_seconds,
            "engine_seconds": engine_s,
            "decode_wait_seconds": result.decode_wait_seconds,
        },
    }
