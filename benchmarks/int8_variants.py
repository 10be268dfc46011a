"""INT8 variants of one run's model: what ``crc-export --int8`` ships against what it chose not to.

    python benchmarks/int8_variants.py RUN_DIR [--work DIR] [--calibration-pairs 256] [--reference-pairs 150]
        [--batch-sizes 8,32] [--rounds 5] [--variants shipped,minmax,...] [--out FILE.json]

Each variant is quantized from the run's FP32 ONNX with crc_export.int8's own functions, calibrated on the
same training pairs, and measured against PyTorch FP32 on the run's test split (top-1 agreement, accuracy
delta, max / mean |logit diff|), and against onnxruntime CPU FP32 for speed: calls interleaved (paired.py),
the median per batch size. ``--rounds 0`` skips the timing (accuracy only, e.g. for the demo model).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import paired  # noqa: E402

# name -> (Int8Config changes, write_qdq options); "shipped" is what crc-export --int8 writes.
VARIANTS = {
    "shipped": ({}, {}),
    "minmax": ({"method": "minmax"}, {}),
    "entropy": ({"method": "entropy"}, {}),
    "symmetric-int8": ({}, {"symmetric_activations": True}),  # TensorRT's encoding
    "reduce-range": ({"reduce_range": True}, {}),
    "conv-only": ({}, {"op_types": ("Conv",)}),
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--work", type=Path, default=None, help="folder for the ONNX files (default: temp)")
    ap.add_argument("--calibration-pairs", type=int, default=256)
    ap.add_argument("--reference-pairs", type=int, default=150, help="test pairs to compare on")
    ap.add_argument("--batch-sizes", default="8,32")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds per batch size (0: none)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    from crc_export.int8 import Int8Config, PairReader, calibration_indices, int8_summary, prepare, write_qdq
    from crc_export.onnx import export_onnx
    from crc_export.reference import build_reference
    from crc_runtime.backends.onnxruntime import OrtBackend
    from crc_runtime.bench import parse_batch_sizes
    from crc_runtime.validate import compare_logits, run_reference
    from crc_train.data import DataConfig, load_split
    from crc_train.rundir import load_checkpoint, model_from_checkpoint

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    sizes = parse_batch_sizes(args.batch_sizes)
    work = args.work or Path(tempfile.mkdtemp(prefix="crc-int8-variants-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(args.run_dir / "checkpoint.pt")
    model = model_from_checkpoint(ckpt)
    data = DataConfig(**json.loads((args.run_dir / "config.json").read_text())["data"])
    fp32_path = export_onnx(model, work / "model.onnx", int(ckpt["image_size"]), external_data=True)
    ref = build_reference(model, load_split(data, "test"), args.reference_pairs)
    train = load_split(data, "train")
    index = calibration_indices(len(train.labels), args.calibration_pairs, seed=0)
    base = Int8Config(calibration_pairs=len(index))
    reader = PairReader(train.pathology[index], train.radiology[index], base.batch_size)
    prepared, regions = prepare(fp32_path, work)
    fp32 = OrtBackend(fp32_path, "cpu").activate()
    rows = []
    for name in names:
        changes, options = VARIANTS[name]
        cfg = replace(base, **changes)
        out = work / f"{name}.onnx"
        t0 = time.perf_counter()
        write_qdq(prepared, out, reader, regions, cfg, **{"symmetric_activations": False, **options})
        seconds = time.perf_counter() - t0
        backend = OrtBackend(out, "cpu", precision="int8").activate()
        metrics = compare_logits(ref["logits"], ref["labels"], run_reference(backend, ref, 16))
        row = {
            "variant": name,
            "config": {**changes, **options},
            "calibration_seconds": seconds,
            **metrics,
            "graph": int8_summary(out),
        }
        if args.rounds:
            row["speed"] = paired.paired_ratio(backend, fp32, sizes, args.rounds)
        backend.deactivate()
        rows.append(row)
        print(_line(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "calibration_pairs": len(index),
                                        "rows": rows}, indent=2) + "\n")  # fmt: skip


def _line(row: dict) -> str:
    delta = (row["accuracy"] - row["reference_accuracy"]) * 100
    speed = "; ".join(f"batch {r['batch_size']} {r['ratio']:.2f}x FP32" for r in row.get("speed", []))
    return (
        f"{row['variant']}: agreement {row['top1_agreement']:.2%}, accuracy {row['accuracy']:.2%} "
        f"(delta {delta:+.2f} pt), max |diff| {row['max_abs_diff']:.3g}, mean |diff| "
        f"{row['mean_abs_diff']:.3g}, calibration {row['calibration_seconds']:.0f} s"
        + (f"; {speed}" if speed else "")
        + f"; INT8 convs {row['graph']['conv_int8']}/{row['graph']['conv_total']}"
    )


if __name__ == "__main__":
    main()
