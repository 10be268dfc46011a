"""``crc-export RUN_DIR -o BUNDLE``: a trained run becomes a bundle, gated on parity with PyTorch."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import click
from crc_runtime.cli_options import EXIT_INTERRUPTED, setup_logging
from crc_runtime.validate import THRESHOLD_KEYS, parse_threshold
from crc_train.cli import missing_modules

from crc_export.int8 import CALIBRATION_METHODS  # numpy only at import time

EXTRA_HINT = "crc-export needs the export extra: pip install 'crc-fusion[export]'"
REQUIRED_MODULES = ("torch", "torchvision", "medmnist", "onnx", "onnxscript", "onnxruntime")


INTERRUPTED = (
    "interrupted: nothing half-written is left (a bundle or Triton repository appears whole or not at all)"
)


def _finite(ctx, param, value):
    """A threshold flag: ``nan`` compares False both ways and ``inf`` disables a gate; refuse both."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _threshold_override(ctx, param, values):
    """``--threshold fp16.max_abs_diff=0.05`` -> [("fp16", "max_abs_diff", 0.05)] (the runtime's syntax)."""
    try:
        parsed = [parse_threshold(text) for text in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    for text, (_, _, number) in zip(values, parsed, strict=True):
        if not math.isfinite(number):
            raise click.BadParameter(f"{text!r}: {number} is not a finite number")
    return parsed


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "bundle",
    required=True,
    type=click.Path(path_type=Path),
    help="Bundle folder to write (created; written to a temporary folder and renamed when complete).",
)
@click.option(
    "--parity-pairs",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Test pairs kept in reference.npz and used by the parity gate.",
)
@click.option(
    "--data-root", default=None, help="Data folder, if it moved since training (overrides config.json)."
)
@click.option(
    "--exporter",
    type=click.Choice(["dynamo", "torchscript"]),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter.",
)
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=17), help="ONNX opset.")
@click.option(
    "--onnx-weights",
    type=click.Choice(["external", "embedded"]),
    default="external",
    show_default=True,
    help="FP32 weights in model.onnx.data beside the graph (onnxruntime maps them: faster start, less "
    "memory) or inside the one model.onnx file.",
)
@click.option(
    "--fp16/--no-fp16",
    default=True,
    show_default=True,
    help="Write model.fp16.onnx (FP16 backbones; attention, softmax, normalisation, pooling, head FP32).",
)
@click.option(
    "--explain/--no-explain",
    default=True,
    show_default=True,
    help="Write model.explain.onnx (logits + each branch's class activation maps, for crc-infer --explain; "
    "its weights are read from model.onnx.data) and reference.explain.npz.",
)
@click.option(
    "--fp16-device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="onnxruntime device for the FP16 parity run (auto: CUDA when onnxruntime-gpu sees a GPU).",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write model.int8.onnx: static INT8 (QDQ, per-channel weights) calibrated on training pairs; "
    "attention, softmax, pooling, head and preprocessing FP32. With --trt, also an INT8 engine from it.",
)
@click.option(
    "--int8-calibration",
    type=click.Choice(CALIBRATION_METHODS),
    default="percentile",
    show_default=True,
    help="How activation ranges are set from the calibration pairs (docs/export.md says why percentile).",
)
@click.option(
    "--int8-calibration-pairs",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Training pairs the INT8 calibration runs on (drawn with a fixed seed; never the test pairs).",
)
@click.option(
    "--int8-reduce-range",
    is_flag=True,
    help="7-bit INT8 weights: for x86 CPUs without VNNI if the INT8 gate fails there (docs/export.md).",
)
@click.option(
    "--fp32-max-abs-diff",
    default=1e-3,
    show_default=True,
    type=click.FloatRange(min=0),
    callback=_finite,
    help="Parity gate: largest allowed |logit difference| for FP32 artifacts.",
)
@click.option(
    "--fp16-min-agreement",
    default=0.995,
    show_default=True,
    type=click.FloatRange(0, 1),
    callback=_finite,
    help="Parity gate: smallest top-1 agreement with PyTorch for FP16 artifacts (ONNX and engine).",
)
@click.option(
    "--fp16-max-accuracy-delta",
    default=0.005,
    show_default=True,
    type=click.FloatRange(min=0),
    callback=_finite,
    help="Parity gate: largest |accuracy - PyTorch accuracy| for FP16 artifacts (0.005 = 0.5 pt).",
)
@click.option(
    "--threshold",
    "threshold_overrides",
    multiple=True,
    callback=_threshold_override,
    metavar="PRECISION.KEY=VALUE",
    help=f"Any other parity threshold, repeatable; KEY: {', '.join(THRESHOLD_KEYS)}.",
)
@click.option(
    "--trt",
    is_flag=True,
    help="Also build a TensorRT engine from model.fp16.onnx (and one from model.int8.onnx with --int8); "
    "needs [trt] and a GPU.",
)
@click.option(
    "--min-batch",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="TensorRT profile: smallest batch.",
)
@click.option(
    "--opt-batch",
    default=64,
    show_default=True,
    type=click.IntRange(min=1),
    help="TensorRT profile: batch the kernels are tuned for.",
)
@click.option(
    "--max-batch",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="TensorRT profile: largest batch (also Triton's max_batch_size).",
)
@click.option(
    "--workspace",
    "workspace_mib",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="TensorRT workspace memory limit in MiB.",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="TensorRT timing cache to start from (default: the one in the bundle being replaced).",
)
@click.option(
    "--gpu",
    "gpu_device",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="CUDA device ordinal the engine is built on.",
)
@click.option(
    "--triton",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also write a Triton Inference Server model repository to this folder.",
)
@click.option(
    "--triton-model-name",
    default="crc_fusion",
    show_default=True,
    help="Prefix of the Triton model names (<name>_onnx, <name>_fp16_onnx, <name>_trt).",
)
@click.option(
    "--triton-max-batch",
    default=None,
    type=click.IntRange(min=1),
    help="Triton max_batch_size (default: --max-batch).",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a bundle (and Triton repository) crc-export wrote; any other non-empty folder is refused.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress.")
@click.option("--quiet", is_flag=True, help="No progress bar (it shows only on a terminal anyway).")
def export_command(run_dir, bundle, verbose, quiet, **opts):
    """Export RUN_DIR (a crc-train run) as a bundle: model.onnx, model.fp16.onnx, reference.npz, manifest.

    Every artifact is gated on parity with PyTorch's FP32 logits on reference.npz; one that fails is
    marked unusable in manifest.json (the runtime refuses it) and the command ends with FAILED.
    """
    from crc_runtime.errors import UserError as RuntimeUserError
    from crc_runtime.errors import printable
    from crc_runtime.validate import format_parity_table
    from crc_train.errors import UserError as TrainUserError

    from .build import ExportConfig, build_bundle
    from .int8 import Int8Config
    from .tensorrt import TrtConfig

    setup_logging(verbose)
    trt = None
    if opts["trt"]:
        trt = TrtConfig(
            min_batch=opts["min_batch"],
            opt_batch=opts["opt_batch"],
            max_batch=opts["max_batch"],
            workspace_mib=opts["workspace_mib"],
            device=opts["gpu_device"],
            timing_cache=opts["timing_cache"],
        )
    cfg = ExportConfig(
        parity_pairs=opts["parity_pairs"],
        data_root=opts["data_root"],
        exporter=opts["exporter"],
        opset=opts["opset"],
        external_data=opts["onnx_weights"] == "external",
        overwrite=opts["overwrite"],
        fp16=opts["fp16"],
        explain=opts["explain"],
        fp16_device=opts["fp16_device"],
        int8=Int8Config(
            calibration_pairs=opts["int8_calibration_pairs"],
            method=opts["int8_calibration"],
            reduce_range=opts["int8_reduce_range"],
        )
        if opts["int8"]
        else None,
        trt=trt,
        triton=opts["triton"],
        triton_model_name=opts["triton_model_name"],
        triton_max_batch=opts["triton_max_batch"] or opts["max_batch"],
        progress=not quiet,
    )
    cfg.thresholds["fp32"]["max_abs_diff"] = opts["fp32_max_abs_diff"]
    cfg.thresholds["fp16"]["min_top1_agreement"] = opts["fp16_min_agreement"]
    cfg.thresholds["fp16"]["max_accuracy_delta"] = opts["fp16_max_accuracy_delta"]
    for precision, key, value in opts["threshold_overrides"]:
        cfg.thresholds[precision][key] = value
    try:
        result = build_bundle(run_dir, bundle, cfg)
    except KeyboardInterrupt:  # the bundle appears only when complete: nothing half-written is left
        click.echo(f"\n{INTERRUPTED}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (RuntimeUserError, TrainUserError) as exc:
        for line in getattr(exc, "details", []):  # e.g. TensorRT parser errors, one per line
            click.echo(f"error: {printable(line)}", err=True)
        click.echo(f"error: {printable(str(exc))}", err=True)
        sys.exit(1)
    rows = [
        {"artifact": a["file"], "precision": a["precision"], **a["parity"]}
        for a in result.manifest["artifacts"]
    ]
    click.echo(format_parity_table(rows))
    click.echo(f"bundle: {result.bundle}")
    if cfg.triton is not None:
        click.echo(f"triton repository: {cfg.triton}")
    if result.passed:
        click.echo("PASSED")
    else:
        failed = [a["file"] for a in result.manifest["artifacts"] if a["parity"].get("passed") is False]
        click.echo(
            f"FAILED: {', '.join(failed)} did not match PyTorch; marked unusable in manifest.json", err=True
        )
        sys.exit(1)


def main() -> None:
    missing = missing_modules(REQUIRED_MODULES)
    if missing:
        click.echo(f"{EXTRA_HINT} (missing: {', '.join(missing)})", err=True)
        sys.exit(1)
    try:
        export_command.main(prog_name="crc-export", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C outside the export itself (click turns it into Abort)
        click.echo(INTERRUPTED, err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:  # unknown flag, bad value: click's usage message, exit 2
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
