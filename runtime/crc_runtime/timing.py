"""Latency statistics the way trtexec reports them: min / mean / median / p90 / p95 / p99 / max in ms."""

from __future__ import annotations

import logging

import numpy as np

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


def per_pair(summary: dict, batch_size: int) -> dict:
    """A per-batch summary divided by the batch size (milliseconds per pair)."""
    return {k: (v / batch_size if k.endswith("_ms") else v) for k, v in summary.items()}


def throughput(pairs: int, seconds: float) -> float:
    """Pairs per second (NaN for a zero or negative duration)."""
    return pairs / seconds if seconds > 0 else float("nan")


def format_latency(summary: dict, keys: tuple[str, ...] = ("median_ms", "p95_ms", "p99_ms")) -> str:
    """``p50 1.23 ms  p95 1.50 ms  p99 1.70 ms`` from a :func:`summarize` dict."""
    names = {"median_ms": "p50", "mean_ms": "mean", "min_ms": "min", "max_ms": "max"}
    return "  ".join(f"{names.get(k, k.removesuffix('_ms'))} {summary[k]:.2f} ms" for k in keys)
