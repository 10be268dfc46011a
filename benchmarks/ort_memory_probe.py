"""Load time, run time and peak RSS of one onnxruntime CPU session under different session options.

Runs in a torch-free environment; start one process per option set so each peak RSS is its own:

    for opts in default noarena noarena,noprepack noarena,noprepack,nomempattern basic; do
        python benchmarks/ort_memory_probe.py BUNDLE/model.onnx --options $opts --pairs 18
    done

Options: ``noarena`` (enable_cpu_mem_arena=False), ``noprepack`` (session.disable_prepacking=1),
``nomempattern`` (enable_mem_pattern=False), ``basic`` (ORT_ENABLE_BASIC instead of ORT_ENABLE_ALL).
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import onnxruntime as ort


def session_options(names: set[str]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = level.ORT_ENABLE_BASIC if "basic" in names else level.ORT_ENABLE_ALL
    if "noarena" in names:
        options.enable_cpu_mem_arena = False
    if "noprepack" in names:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if "nomempattern" in names:
        options.enable_mem_pattern = False
    return options


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="an ONNX file of a crc-fusion bundle")
    parser.add_argument("--options", default="default", help="comma-separated option names (see above)")
    parser.add_argument("--pairs", type=int, default=18, help="batch size of the two timed calls")
    args = parser.parse_args()
    names = set(args.options.split(","))

    start = time.perf_counter()
    session = ort.InferenceSession(args.model, session_options(names), providers=["CPUExecutionProvider"])
    loaded = time.perf_counter()
    inputs = {}
    rng = np.random.default_rng(0)
    for spec in session.get_inputs():
        shape = [args.pairs, *spec.shape[1:]]
        inputs[spec.name] = rng.integers(0, 256, shape, dtype=np.uint8)
    session.run(None, inputs)
    first = time.perf_counter()
    session.run(None, inputs)
    second = time.perf_counter()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"{args.options:32s} pairs {args.pairs:3d}  load {loaded - start:.2f} s  "
        f"first {first - loaded:.2f} s  second {second - first:.2f} s  peak RSS {peak_mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
