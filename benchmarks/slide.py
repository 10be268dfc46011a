"""Whole-slide throughput: tiles/s end-to-end (read + resample + infer) against engine-only, one run.

    python benchmarks/slide.py --backbone resnet50 --size 64     # builds the harness's bundle (needs torch)
    python benchmarks/slide.py --bundle BUNDLE [--backend ort-cpu] [--artifact fp32] [--batch-size 64]
        [--mpp 0.25]

The slide is a tiled pyramidal TIFF (zlib-compressed 256-px tiles; ``--compression none`` for raw ones), a
mosaic of the 18 example tiles of examples/pairs/ (upscaled, so every tile holds tissue), written once into
the work folder. At the default 0.25 um/px with
downsamples 1, 4, 16 (an Aperio 40x layout) every tile is read from level 0 as 448 x 448 px and resampled
to 224 px: the costliest read path. The engine alone is timed on synthetic inputs at the same batch size
right before and right after the slide run (the machine's load moves between measurements; the ratio uses
their mean), then the tile reader alone (same threads, no model) shows how far reading is from the limit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import make_slide as make_slide_lib  # noqa: E402 (examples/make_slide.py)

log = logging.getLogger("benchmarks.slide")


def make_slide(path: Path, side_px: int, mpp: float, downsamples: tuple[int, ...], compression: str) -> Path:
    """A ``side_px`` square mosaic of the example tiles (each 112 um) as a pyramidal TIFF of 256-px tiles."""
    if path.is_file():
        return path
    cell = round(112 / mpp)
    tiles = list(make_slide_lib.example_tiles(cell).values())
    n = side_px // cell
    image = np.empty((n * cell, n * cell, 3), dtype=np.uint8)
    for r in range(n):
        for c in range(n):
            image[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = tiles[(r * n + c * 7) % len(tiles)]
    tmp = path.with_suffix(".tmp")
    compression = None if compression == "none" else compression
    make_slide_lib.write_slide(tmp, make_slide_lib.pyramid(image, downsamples), mpp, compression=compression)
    tmp.rename(path)
    return path


def reader_only(job, workers: int, limit: int) -> float:
    """Tiles/s of the tile reader alone (read + resample + resize rule), ``workers`` threads, no model."""
    tiles = job.grid.tiles[:limit]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for _ in pool.map(job.reader, tiles):
            pass
    return len(tiles) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--bundle", type=Path, default=None, help="bundle to run (default: build one, needs torch)"
    )
    ap.add_argument("--backbone", default="resnet50", help="for the built bundle")
    ap.add_argument("--size", type=int, default=64, help="for the built bundle")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "crc-bench-slide")
    ap.add_argument("--mpp", type=float, default=0.25, help="level-0 microns per pixel of the test slide")
    ap.add_argument("--side-px", type=int, default=7168, help="level-0 side of the test slide")
    ap.add_argument(
        "--compression",
        default="zlib",
        choices=["zlib", "none"],
        help="TIFF tile compression (scanners write JPEG, which tifffile cannot write without imagecodecs; "
        "zlib's decode is the costlier stand-in, none the cheaper)",
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backend", default="ort-cpu", choices=["auto", "ort-cpu", "ort-cuda", "trt"])
    ap.add_argument("--artifact", default=None, help="as crc-infer's --artifact (fp32, int8); default: auto")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--workers", type=int, default=None, help="tile reader threads (default: the runtime's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from crc_runtime.bench import bench_batch
    from crc_runtime.bundle import load_bundle
    from crc_runtime.predict import default_workers
    from crc_runtime.predictor import Predictor
    from crc_runtime.slide import SlideJob
    from crc_runtime.timing import environment, throughput

    args.work.mkdir(parents=True, exist_ok=True)
    if args.bundle is None:
        from run import build_bundle

        args.bundle = build_bundle(
            args.work / f"{args.backbone}-{args.size}", args.backbone, args.size, False
        )[1]
    bundle = load_bundle(args.bundle)
    downsamples = (1, 4, 16) if args.mpp < 0.4 else (1, 2, 4)
    name = f"mosaic-{args.side_px}-{args.mpp:g}-{args.compression}.tif"
    slide_path = make_slide(args.work / name, args.side_px, args.mpp, downsamples, args.compression)
    workers = default_workers() if args.workers is None else args.workers
    job = SlideJob(slide_path, make_slide_lib.RADIOLOGY, bundle, args.work / "out", min_tissue=0.0)
    batch = args.batch_size
    predictor = Predictor(bundle, args.backend, batch, artifact=args.artifact, threads=args.threads)
    backend = predictor.backend
    tiles = len(job.grid.tiles)
    calls = max(3, math.ceil(tiles / batch / 2))
    try:
        bench_batch(backend, batch, warmup_iters=2, iterations=1)  # a warmed engine, as in the slide run
        before = bench_batch(backend, batch, warmup_iters=0, iterations=calls)
        job.start(predictor)
        result = job.run(predictor, workers)
        after = bench_batch(backend, batch, warmup_iters=0, iterations=calls)
    finally:
        predictor.close()
    reading = reader_only(job, workers, min(tiles, 8 * batch))
    job.close()
    engine = (before["throughput_pairs_per_s"] + after["throughput_pairs_per_s"]) / 2
    e2e = throughput(result.processed, result.total_seconds)
    g = job.grid
    numbers = {
        "backend": backend.name,
        "artifact": predictor.artifact["file"],
        "model_input": bundle.image_size,
        "batch_size": batch,
        "slide": {
            "mpp": args.mpp,
            "side_px": args.side_px,
            "downsamples": list(downsamples),
            "compression": args.compression,
        },
        "read": {"level": g.level, "px": [g.read_w, g.read_h], "workers": workers},
        "tiles": result.processed,
        "end_to_end_tiles_per_s": e2e,
        "engine_only_tiles_per_s": {
            "before": before["throughput_pairs_per_s"],
            "after": after["throughput_pairs_per_s"],
        },
        "reader_only_tiles_per_s": reading,
        "ratio_end_to_end_over_engine": e2e / engine,
        "model_waited_for_tiles_s": result.decode_wait_seconds,
        "environment": environment(backend),
    }
    print(
        f"{backend.name} on {predictor.artifact['file']} ({bundle.image_size} px input), batch {batch}, "
        f"{result.processed} tiles read at level {g.level} as {g.read_w} x {g.read_h} px, "
        f"{workers} reader threads"
    )
    b, a, wait = before["throughput_pairs_per_s"], after["throughput_pairs_per_s"], result.decode_wait_seconds
    print(f"  engine-only   {b:8.1f} tiles/s before the slide run, {a:.1f} after")
    print(
        f"  end-to-end    {e2e:8.1f} tiles/s (read + resample + infer; model waited {wait:.2f} s for tiles)"
    )
    print(f"  reader-only   {reading:8.1f} tiles/s (read + resample + resize rule, no model)")
    print(f"  ratio end-to-end / engine-only: {e2e / engine:.3f} (target >= 0.9)")
    if args.json is not None:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")


if __name__ == "__main__":
    main()
