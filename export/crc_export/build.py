"""Turn a training run directory into a bundle (docs/bundle.md) and gate every artifact on parity."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from crc_runtime.backends.onnxruntime import OrtBackend
from crc_runtime.bundle import SCHEMA_VERSION, sha256_file, write_manifest
from crc_runtime.errors import UserError
from crc_runtime.validate import DEFAULT_THRESHOLDS, compare_logits, gate

from .onnx import DEFAULT_OPSET, check_onnx, export_onnx
from .reference import build_reference, write_reference

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class ExportConfig:
    """Every choice ``crc-export`` makes, with its default."""

    parity_pairs: int = 256  # pairs of the test split kept in reference.npz
    data_root: str | None = None  # overrides the data folder recorded in the run's config.json
    exporter: str = "dynamo"  # "dynamo" (torch.export) or "torchscript" (legacy tracer)
    opset: int = DEFAULT_OPSET  # ONNX opset, >= 17
    batch_size: int = 64  # batch size for the reference logits and the parity run
    overwrite: bool = False  # replace an existing bundle folder
    thresholds: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_THRESHOLDS)))


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict
    passed: bool


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "medmnist", "crc-fusion"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    """The commit of the crc-fusion checkout that produced the bundle, when it is a git checkout."""
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_run(run_dir: Path):
    """Read the run's config and checkpoint and rebuild its model."""
    from crc_train.checkpoint import load_checkpoint, model_from_checkpoint

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory (expected the --out folder of crc-train)")
    ckpt_path = run_dir / CHECKPOINT_NAME
    config_path = run_dir / "config.json"
    for required in (ckpt_path, config_path):
        if not required.is_file():
            raise UserError(f"{required}: missing; is {run_dir} a finished crc-train run?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    ckpt = load_checkpoint(ckpt_path)
    return config, ckpt, model_from_checkpoint(ckpt)


def _parity_entry(backend_name: str, ref: dict[str, np.ndarray], logits: np.ndarray, precision: str,
                  thresholds: dict) -> dict:
    metrics = compare_logits(ref["logits"], ref["labels"], logits)
    passed, reasons = gate(metrics, precision, thresholds.get(precision))
    return {"backend": backend_name, **metrics, "passed": passed, "reasons": reasons,
            "thresholds": thresholds.get(precision)}


def run_onnx(model_path: Path, ref: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    """Logits of an ONNX file on onnxruntime's CPU provider, batch by batch."""
    backend = OrtBackend(model_path, device="cpu")
    try:
        chunks = []
        for start in range(0, len(ref["labels"]), batch_size):
            batch = {name: ref[name][start : start + batch_size] for name in ("pathology", "radiology")}
            chunks.append(backend.infer(batch)["logits"])
    finally:
        backend.close()
    return np.concatenate(chunks)


def build_bundle(run_dir: Path, bundle: Path, cfg: ExportConfig) -> ExportResult:
    """Export ``run_dir`` into ``bundle``; the folder appears complete or not at all."""
    from crc_train.data import DataConfig, load_split

    run_dir, bundle = Path(run_dir), Path(bundle)
    if bundle.exists() and any(bundle.iterdir()) and not cfg.overwrite:
        raise UserError(f"{bundle}: exists and is not empty; pass --overwrite to replace it")
    config, ckpt, model = _load_run(run_dir)
    data_cfg = DataConfig(**config["data"])
    if cfg.data_root is not None:
        data_cfg.root = cfg.data_root
    test = load_split(data_cfg, "test")
    image_size = int(ckpt["image_size"])

    bundle.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.partial-", dir=bundle.parent))
    umask = os.umask(0)
    os.umask(umask)
    work.chmod(0o777 & ~umask)  # mkdtemp makes it private; the finished bundle gets normal permissions
    try:
        onnx_path = export_onnx(model, work / "model.onnx", image_size, exporter=cfg.exporter, opset=cfg.opset)
        check_onnx(onnx_path)
        ref = build_reference(model, test, cfg.parity_pairs, cfg.batch_size)
        write_reference(work / "reference.npz", ref)

        parity = _parity_entry("ort-cpu", ref, run_onnx(onnx_path, ref, cfg.batch_size), "fp32", cfg.thresholds)
        artifacts = [{"file": "model.onnx", "kind": "onnx", "precision": "fp32", "usable": parity["passed"],
                      "parity": parity}]
        manifest = _manifest(ckpt, config, run_dir, ref, artifacts, image_size,
                             files={name: sha256_file(work / name) for name in ("model.onnx", "reference.npz")})
        write_manifest(work, manifest)
        _replace_dir(work, bundle)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    passed = all(a["usable"] for a in artifacts)
    return ExportResult(bundle=bundle, manifest=manifest, passed=passed)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder into place; an old bundle is removed only after the new one is there."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _manifest(ckpt: dict, config: dict, run_dir: Path, ref: dict, artifacts: list[dict], image_size: int,
              files: dict[str, str]) -> dict:
    classes = list(ckpt["classes"])
    model_cfg = ckpt["model_config"]
    labels, logits = ref["labels"], ref["logits"]
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"architecture": "dual-resnet", "backbone": model_cfg.get("backbone"),
                  "fusion": model_cfg.get("fusion"), "image_size": image_size},
        "classes": classes,
        "inputs": [
            {"name": "pathology", "dtype": "uint8", "shape": ["batch", image_size, image_size, 3], "color_mode": "RGB"},
            {"name": "radiology", "dtype": "uint8", "shape": ["batch", image_size, image_size, 1], "color_mode": "L"},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(classes)]}],
        "resize": {"library": "Pillow", "filter": "BILINEAR", "size": [image_size, image_size],
                   "when": "the decoded image is not already size x size"},
        "files": files,
        "artifacts": artifacts,
        "reference": {"file": "reference.npz", "pairs": int(len(labels)), "split": "test",
                      "accuracy": float((logits.argmax(1) == labels).mean())},
        "provenance": {
            "run_id": ckpt.get("run_id") or config.get("run_id"),
            "run_dir": str(run_dir.resolve()),
            "git_commit": _git_commit(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        },
    }
