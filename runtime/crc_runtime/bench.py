"""``crc-infer bench``: time the engine alone on synthetic uint8 inputs, one row per batch size.

Like trtexec: a warm-up (untimed), then timed iterations, either a fixed count or as many as fit in a
duration; per-batch and per-pair latency percentiles, the H2D / compute / D2H split when the backend
times it, and throughput in pairs/s. Inputs are random uint8 made once per batch size with a fixed
seed, so every backend sees the same bytes.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from .backends.base import Backend, TensorSpec
from .errors import UserError
from .timing import latency_section, throughput

log = logging.getLogger(__name__)

MIN_ITERATIONS = 5  # a duration-bounded run still times at least this many calls
MAX_DURATION = 86_400.0  # seconds per batch size: a day


def check_duration(seconds: float) -> float:
    """``seconds`` if it is a duration a benchmark can end after: finite, above 0, at most a day.

    Raises:
        UserError: NaN (a comparison with it is never true, so the timing loop would never end), inf,
            0 or less, or more than :data:`MAX_DURATION`.
    """
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_DURATION):
        raise UserError(f"{seconds!r} is not a duration above 0 and at most {MAX_DURATION:g} seconds")
    return seconds


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``.

    Raises:
        UserError: Anything but a comma-separated list of positive integers.
    """
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 1 for s in sizes):
        raise UserError(
            f"--batch-sizes {text!r}: expected positive integers separated by commas, e.g. 1,8,32"
        )
    return sizes


def synthetic_inputs(specs: list[TensorSpec], batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the model's dtypes with the batch dimension set to ``batch_size``.

    Raises:
        UserError: A dimension other than the first is free, so no shape can be made up.
    """
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        rest = spec.shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise UserError(f"input {spec.describe()}: only the batch dimension may be free to benchmark it")
        shape = (batch_size, *rest)
        dtype = np.dtype(spec.dtype)
        if dtype.kind in "ui":
            info = np.iinfo(dtype)
            inputs[spec.name] = rng.integers(info.min, int(info.max) + 1, size=shape, dtype=dtype)
        else:
            inputs[spec.name] = rng.standard_normal(size=shape).astype(dtype)
    return inputs


def bench_batch(
    backend: Backend,
    batch_size: int,
    warmup_iters: int = 10,
    iterations: int | None = None,
    duration: float = 3.0,
    seed: int = 0,
    min_iterations: int = MIN_ITERATIONS,
) -> dict:
    """Time ``backend.infer`` at one batch size.

    Args:
        backend: An open backend.
        batch_size: Pairs per call.
        warmup_iters: Untimed calls first (lazy initialisation, cuDNN / TensorRT tactic caches, clocks).
        iterations: Timed calls; None runs for ``duration`` seconds (at least :data:`MIN_ITERATIONS`).
        duration: Seconds of timed calls when ``iterations`` is None.
        seed: Seed of the synthetic inputs.
        min_iterations: Timed calls a duration-bounded run makes at least.

    Returns:
        batch_size, warmup_iterations, warmup_seconds, iterations, seconds, latency (see
        :func:`~crc_runtime.timing.latency_section`) and throughput_pairs_per_s.
    """
    inputs = synthetic_inputs(backend.input_specs, batch_size, seed)
    t_warm = time.perf_counter()
    for _ in range(warmup_iters):
        backend.infer(inputs)
    warmup_seconds = time.perf_counter() - t_warm
    times: list[float] = []
    stages: dict[str, list[float]] = {}
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        backend.infer(inputs)
        times.append(time.perf_counter() - t0)
        for stage, ms in backend.last_timings.items():
            stages.setdefault(stage, []).append(ms)
        if iterations is not None:
            if len(times) >= iterations:
                break
        elif time.perf_counter() - start >= duration and len(times) >= min_iterations:
            break
    total = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "warmup_iterations": warmup_iters,
        "warmup_seconds": warmup_seconds,
        "iterations": len(times),
        "seconds": total,
        "latency": latency_section(times, [batch_size] * len(times), stages),
        # Engine-only: pairs over the summed call times (the loop's own overhead left out).
        "throughput_pairs_per_s": throughput(batch_size * len(times), sum(times)),
    }


def run_bench(
    backend: Backend,
    batch_sizes: list[int],
    warmup_iters: int = 10,
    iterations: int | None = None,
    duration: float = 3.0,
) -> list[dict]:
    """:func:`bench_batch` for each batch size; sizes beyond an engine's profile get a skipped row.

    Raises:
        UserError: A count below its minimum or a duration :func:`check_duration` refuses, before any
            call is made.
    """
    if warmup_iters < 0 or (iterations is not None and iterations < 1):
        raise UserError(f"warm-up calls {warmup_iters} must be >= 0 and timed calls {iterations} >= 1")
    if iterations is None:
        check_duration(duration)
    rows = []
    for n in batch_sizes:
        if backend.max_batch is not None and n > backend.max_batch:
            rows.append(
                {"batch_size": n, "skipped": f"above the engine profile's max batch {backend.max_batch}"}
            )
            continue
        log.info("bench %s batch %d", backend.name, n)
        rows.append(bench_batch(backend, n, warmup_iters, iterations, duration))
    return rows


def format_bench_table(rows: list[dict]) -> str:
    """Fixed-width table: batch, iterations, latency per batch, ms per pair, pairs/s, stage p50s."""
    staged = any("h2d" in r.get("latency", {}) for r in rows)
    head = ["batch", "iters", "p50 ms", "p90 ms", "p99 ms", "mean ms", "ms/pair p50", "pairs/s"]
    if staged:
        head += ["H2D p50", "compute p50", "D2H p50"]
    lines = [head]
    for r in rows:
        if "skipped" in r:
            lines.append([str(r["batch_size"]), "-", f"skipped: {r['skipped']}"])
            continue
        b, p = r["latency"]["per_batch"], r["latency"]["per_pair"]
        line = [
            str(r["batch_size"]),
            str(r["iterations"]),
            *(f"{b[k]:.3f}" for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms")),
            f"{p['median_ms']:.4f}",
            f"{r['throughput_pairs_per_s']:.1f}",
        ]
        if staged:
            line += [
                f"{r['latency'][s]['median_ms']:.3f}" if s in r["latency"] else "-"
                for s in ("h2d", "compute", "d2h")
            ]
        lines.append(line)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(head))]
    out = []
    for line in lines:
        if len(line) < len(head):  # a skipped row: the reason runs on past the columns
            out.append("  ".join([line[0].rjust(widths[0]), line[1].rjust(widths[1]), line[2]]))
        else:
            out.append("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))
    return "\n".join(out)
