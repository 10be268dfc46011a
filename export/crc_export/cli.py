"""``crc-export RUN_DIR -o BUNDLE``: a trained run becomes a bundle, gated on parity with PyTorch."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import click

EXTRA_HINT = "crc-export needs the export extra: pip install 'crc-fusion[export]'"
REQUIRED_MODULES = ("torch", "torchvision", "medmnist", "onnx", "onnxscript", "onnxruntime")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "bundle", required=True, type=click.Path(path_type=Path),
              help="Bundle folder to write (created; written to a temporary folder and renamed when complete).")
@click.option("--parity-pairs", default=256, show_default=True, type=click.IntRange(min=1),
              help="Test pairs kept in reference.npz and used by the parity gate.")
@click.option("--data-root", default=None, help="Data folder, if it moved since training (overrides config.json).")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=17), help="ONNX opset.")
@click.option("--fp32-max-abs-diff", default=1e-3, show_default=True, type=float,
              help="Parity gate: largest allowed |logit difference| for FP32 artifacts.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle folder.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress.")
def export_command(run_dir, bundle, parity_pairs, data_root, exporter, opset, fp32_max_abs_diff, overwrite, verbose):
    """Export RUN_DIR (a crc-train run) as a bundle: model.onnx, reference.npz and manifest.json."""
    from crc_runtime.errors import UserError as RuntimeUserError
    from crc_runtime.validate import format_parity_table
    from crc_train.errors import UserError as TrainUserError

    from .build import ExportConfig, build_bundle

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = ExportConfig(parity_pairs=parity_pairs, data_root=data_root, exporter=exporter, opset=opset,
                       overwrite=overwrite)
    cfg.thresholds["fp32"]["max_abs_diff"] = fp32_max_abs_diff
    try:
        result = build_bundle(run_dir, bundle, cfg)
    except (RuntimeUserError, TrainUserError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    rows = [{"artifact": a["file"], "precision": a["precision"], **a["parity"]} for a in result.manifest["artifacts"]]
    click.echo(format_parity_table(rows))
    click.echo(f"bundle: {result.bundle}")
    if result.passed:
        click.echo("PASSED")
    else:
        click.echo("FAILED: an artifact did not match PyTorch; it is marked unusable in manifest.json", err=True)
        sys.exit(1)


def main() -> None:
    missing = [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        click.echo(f"{EXTRA_HINT} (missing: {', '.join(missing)})", err=True)
        sys.exit(1)
    export_command()


if __name__ == "__main__":
    main()
