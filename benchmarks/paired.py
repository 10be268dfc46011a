"""Interleaved A/B timing: on a shared machine, load drifts between two back-to-back measurements.

Calls alternate (A, B, A, B, ...) on the same inputs, so both backends see the same load; the ratio of
the median call times is reported per batch size. Used for the onnxruntime CPU / torch eager CPU target.
"""

from __future__ import annotations

import statistics
import time

from crc_runtime.bench import synthetic_inputs


def paired_ratio(a, b, batch_sizes: list[int], rounds: int = 7, warmup: int = 2) -> list[dict]:
    """Median seconds per call of ``a`` and ``b`` (each a runtime Backend), interleaved, per batch size.

    Returns:
        One row per batch size: batch_size, rounds, a/b names, a_pairs_per_s, b_pairs_per_s and
        ratio = b's median time / a's median time (> 1: ``a`` is faster).
    """
    rows = []
    for n in batch_sizes:
        inputs = synthetic_inputs(a.input_specs, n)
        for _ in range(warmup):
            a.infer(inputs)
            b.infer(inputs)
        ta, tb = [], []
        for _ in range(rounds):
            for backend, times in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                backend.infer(inputs)
                times.append(time.perf_counter() - t0)
        ma, mb = statistics.median(ta), statistics.median(tb)
        rows.append(
            {
                "batch_size": n,
                "rounds": rounds,
                "a": a.name,
                "b": b.name,
                "a_pairs_per_s": n / ma,
                "b_pairs_per_s": n / mb,
                "ratio": mb / ma,
            }
        )
    return rows
