"""What ``crc-infer --explain`` costs, and what extra outputs on model.onnx would cost the default path.

Two measurements on one bundle (written by crc-export with its explain artifact), CPU, torch-free:

1. **ms/pair with and without --explain, same run**: the runtime's own folder pipeline (decode + resize +
   infer, streaming) on one folder, alternating a plain run (``model.onnx``) and an explain run
   (``model.explain.onnx`` + margin split + two overlay PNGs per pair), ``--rounds`` times each; medians.
2. **extra outputs on the predict graph** (the design question of docs/export.md): engine-only calls,
   interleaved, of ``model.onnx`` against the explain graph fetching every output, and against the
   explain graph fetching ``logits`` only (what model.onnx with extra outputs costs a caller that does not
   read them).

    python benchmarks/explain.py BUNDLE --pairs 256 --side 224 --batch-size 32 --rounds 5 --out explain.json

The folder is generated (random smooth PNG pairs of side ``--side``, so every pair is decoded and
resized, and overlays are written at that size) unless ``--folder`` names one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e import make_folder  # noqa: E402
from paired import paired_ratio  # noqa: E402


class Calls:
    """A runtime backend under another name for the table; with ``only``, it asks the onnxruntime session
    for those outputs alone, as a caller that does not read the others would (onnxruntime still runs every
    node of the graph: it does not prune by requested output)."""

    def __init__(self, backend, name: str, only: list[str] | None = None) -> None:
        self.backend, self.name, self.only = backend, name, only
        self.input_specs = backend.input_specs

    def infer(self, inputs):
        if self.only is None:
            return self.backend.infer(inputs)
        return dict(zip(self.only, self.backend._session.run(self.only, inputs), strict=True))


def folder_runs(bundle, folder: Path, batch_size: int, rounds: int, threads: int | None) -> dict:
    """Alternate plain and explain runs of the folder pipeline; ms per pair of each, medians."""
    from crc_runtime.explain import ExplainWriter
    from crc_runtime.pairs import discover_pairs
    from crc_runtime.predict import default_workers
    from crc_runtime.predictor import Predictor

    pairs = discover_pairs(folder)
    times: dict[str, list[float]] = {"plain": [], "explain": []}
    with (
        Predictor(bundle, "ort-cpu", batch_size, threads=threads) as plain,
        Predictor(bundle, "ort-cpu", batch_size, threads=threads, explain=True) as explain,
    ):
        for _ in range(rounds):
            result = plain.predict_folder(pairs, keep_predictions=False)
            times["plain"].append(1e3 * result.total_seconds / result.processed)
            with tempfile.TemporaryDirectory() as out:
                plan = dict(explain.plan)
                writer = ExplainWriter(
                    Path(out) / "explain", bundle, explain.explain, plan, default_workers(), pairs.confined
                )
                try:
                    result = explain.predict_folder(pairs, keep_predictions=False, explainer=writer)
                finally:
                    writer.close()
                times["explain"].append(1e3 * result.total_seconds / result.processed)
    plain_ms, explain_ms = statistics.median(times["plain"]), statistics.median(times["explain"])
    return {
        "pairs": result.processed,
        "batch_size": batch_size,
        "rounds": rounds,
        "plain_ms_per_pair": plain_ms,
        "explain_ms_per_pair": explain_ms,
        "explain_extra_ms_per_pair": explain_ms - plain_ms,
        "ratio": explain_ms / plain_ms,
        "all_ms": times,
    }


def extra_outputs(bundle, batch_sizes: list[int], rounds: int, threads: int | None) -> list[dict]:
    """Engine-only: model.onnx against the explain graph (all outputs, and logits only), interleaved."""
    from crc_runtime.backends import open_onnx
    from crc_runtime.explain import explain_artifact

    art = explain_artifact(bundle)
    plain_path = bundle.artifact_path(bundle.artifact("fp32"))
    with (
        open_onnx(plain_path, "cpu", intra_op_threads=threads) as plain,
        open_onnx(bundle.artifact_path(art), "cpu", intra_op_threads=threads) as explain,
    ):
        a = Calls(plain, "model.onnx")
        rows = paired_ratio(a, Calls(explain, "model.explain.onnx, every output"), batch_sizes, rounds=rounds)
        rows += paired_ratio(
            a, Calls(explain, "model.explain.onnx, logits only", ["logits"]), batch_sizes, rounds=rounds
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--folder", type=Path, default=None, help="pairs to run (default: generated)")
    parser.add_argument("--pairs", type=int, default=256, help="pairs in the generated folder")
    parser.add_argument("--side", type=int, default=224, help="side of the generated images, px")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "crc-explain-bench")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engine-batch-sizes", default="1,32")
    parser.add_argument("--engine-rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    from crc_runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    folder = args.folder or make_folder(
        args.work / f"pairs-{args.pairs}-{args.side}", args.pairs, args.side // 4
    )
    t0 = time.time()
    runs = folder_runs(bundle, folder, args.batch_size, args.rounds, args.threads)
    sizes = [int(s) for s in args.engine_batch_sizes.split(",")]
    engine = extra_outputs(bundle, sizes, args.engine_rounds, args.threads)
    results = {
        "command": " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "cpus": len(__import__("os").sched_getaffinity(0))},
        "bundle": str(args.bundle),
        "folder": str(folder),
        "folder_runs": runs,
        "engine_only": engine,
        "seconds": time.time() - t0,
    }
    print(
        f"folder pipeline, {runs['pairs']} pairs, batch {runs['batch_size']}, median of {runs['rounds']} "
        f"alternating rounds: {runs['plain_ms_per_pair']:.3f} ms/pair without --explain, "
        f"{runs['explain_ms_per_pair']:.3f} ms/pair with (x{runs['ratio']:.2f}, "
        f"+{runs['explain_extra_ms_per_pair']:.3f} ms/pair)"
    )
    print(
        "| engine only, against model.onnx | batch | model.onnx pairs/s | this pairs/s | time / model.onnx |"
    )
    print("|---|---:|---:|---:|---:|")
    for row in engine:
        print(
            f"| {row['b']} | {row['batch_size']} | {row['a_pairs_per_s']:.1f} | {row['b_pairs_per_s']:.1f} "
            f"| {row['ratio']:.3f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
