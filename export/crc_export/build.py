"""Turn a training run directory into a bundle (docs/bundle.md) and gate every artifact on parity.

Every request is checked before the minutes of export work (``_preflight``; where it may write:
outputs.py), and the bundle appears complete or not at all (``atomic_folder``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from crc_runtime.atomic import atomic_folder
from crc_runtime.bundle import SCHEMA_VERSION, sha256_file, write_manifest
from crc_runtime.errors import UserError
from crc_runtime.validate import DEFAULT_THRESHOLDS

from .explain import explain_artifact
from .fp16 import FP16_FILE, export_fp16_onnx, precision_summary
from .int8 import INT8_FILE, INT8_TRT_FILE, Int8Config, calibration_indices, quantize_model
from .onnx import DEFAULT_OPSET, check_onnx, export_onnx
from .outputs import bundle_problem, check_output_folder, writing
from .parity import onnx_artifact, parity_entry
from .reference import build_reference, write_reference
from .tensorrt import TrtConfig, build_engine, engine_logits, require_tensorrt
from .triton import DEFAULT_MODEL_NAME, check_model_name, repository_problem, write_triton_repository

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class ExportConfig:
    """Every choice ``crc-export`` makes, with its default."""

    parity_pairs: int = 256  # pairs of the test split kept in reference.npz
    data_root: str | None = None  # overrides the data folder recorded in the run's config.json
    exporter: str = "dynamo"  # "dynamo" (torch.export) or "torchscript" (legacy tracer)
    opset: int = DEFAULT_OPSET  # ONNX opset, >= 17
    external_data: bool = True  # FP32 weights in model.onnx.data (mapped by onnxruntime) or inside model.onnx
    batch_size: int = 64  # batch size for the reference logits and the parity run
    overwrite: bool = False  # replace an existing bundle folder (and an existing Triton repository)
    thresholds: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_THRESHOLDS)))
    fp16: bool = True  # also write model.fp16.onnx (needed by --trt)
    explain: bool = True  # also write model.explain.onnx (crc-infer --explain) and reference.explain.npz
    fp16_device: str = (
        "auto"  # onnxruntime device for the FP16 parity run: auto (CUDA when present), cpu, cuda
    )
    int8: Int8Config | None = None  # also write model.int8.onnx, calibrated on training pairs
    trt: TrtConfig | None = None  # TensorRT engines from model.fp16.onnx (and model.int8.trt.onnx)
    triton: Path | None = None  # write a Triton model repository here
    triton_model_name: str = DEFAULT_MODEL_NAME  # prefix of the Triton model names
    triton_max_batch: int | None = None  # Triton max_batch_size (default: the engine profile's max batch)
    progress: bool = True  # a bar over the export steps, on a terminal only


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
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _load_run(run_dir: Path):
    """Read the run's config and checkpoint (both checked field by field) and rebuild its model."""
    from crc_train.config import load_run_config
    from crc_train.rundir import load_checkpoint, model_from_checkpoint

    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a run directory (expected the --out folder of crc-train)")
    ckpt_path = run_dir / CHECKPOINT_NAME
    config_path = run_dir / "config.json"
    for required in (ckpt_path, config_path):
        if not required.is_file():
            raise UserError(f"{required}: missing; is {run_dir} a finished crc-train run?")
    run_cfg, config = load_run_config(config_path)
    ckpt = load_checkpoint(ckpt_path)
    return run_cfg, config, ckpt, model_from_checkpoint(ckpt, ckpt_path)


def _engine_artifact(
    source: Path,
    precision: str,
    work: Path,
    image_size: int,
    ref: dict,
    cfg: ExportConfig,
    previous: Path | None,
) -> dict:
    """Build a TensorRT engine from an ONNX artifact and gate it with the runtime's TensorRT backend.

    Args:
        source: model.fp16.onnx (FP16 engine) or model.int8.trt.onnx (INT8 engine, explicit Q/DQ).
        precision: ``fp16`` or ``int8``: the engine's name, manifest entry and parity thresholds.
    """
    shapes = {"pathology": (image_size, image_size, 3), "radiology": (image_size, image_size, 1)}
    built = build_engine(source, work, shapes, cfg.trt, previous_dir=previous, precision=precision)
    art = {
        "file": built["file"],
        "kind": "tensorrt",
        "precision": precision,
        "engine": built["engine"],
        "timing_cache": built["timing_cache"],
    }
    try:
        logits = engine_logits(
            work / built["file"], built["engine"], ref, cfg.batch_size, cfg.trt.device, precision
        )
    except UserError as exc:  # an engine the runtime cannot load or run is a failed artifact, not a crash
        art.update(
            usable=False, parity={"backend": "trt", "passed": False, "reasons": [f"cannot run: {exc}"]}
        )
        return art
    parity = parity_entry("trt", ref, logits, precision, cfg.thresholds)
    art.update(usable=parity["passed"], parity=parity)
    return art


def _int8_artifact(
    fp32_path: Path, work: Path, data_cfg, ref: dict, cfg: ExportConfig
) -> tuple[dict, dict | None]:
    """Quantize ``model.onnx`` on training pairs and gate the result on the CPU like any artifact.

    The calibration pairs come from the run's training split (``load_split(data_cfg, "train")``); the
    reference set is the test split, so no reference pair is ever seen by the calibration. With ``--trt``
    the TensorRT encoding (``model.int8.trt.onnx``) is written too.

    Returns:
        The manifest entry of model.int8.onnx, and the quantization record of model.int8.trt.onnx (None
        without ``--trt``) for the engine built from it.
    """
    from crc_train.data import load_split

    train = load_split(data_cfg, "train")
    index = calibration_indices(len(train.labels), cfg.int8.calibration_pairs, cfg.int8.seed)
    if len(index) < cfg.int8.calibration_pairs:
        log.warning(
            "INT8 calibration: the training split has %d pairs, fewer than the %d asked for; using all",
            len(index),
            cfg.int8.calibration_pairs,
        )
    out = work / INT8_FILE
    trt_path = work / INT8_TRT_FILE if cfg.trt is not None else None
    record = quantize_model(
        fp32_path, out, train.pathology[index], train.radiology[index], cfg.int8, trt_path=trt_path
    )
    trt_record = record.pop("tensorrt", None)
    for rec in (record, trt_record):
        if rec is not None:
            rec["calibration"].update(
                split="train",
                pairs=int(len(index)),
                requested_pairs=cfg.int8.calibration_pairs,
                selection=f"drawn without replacement from {len(train.labels)} training pairs, "
                f"seed {cfg.int8.seed}",
            )
    for path in (out, trt_path):
        if path is not None:
            check_onnx(path)
    entry = onnx_artifact(out, "int8", ref, cfg.thresholds, cfg.batch_size)
    entry["quantization"] = record
    return entry, trt_record


def _preflight(run_dir: Path, bundle: Path, cfg: ExportConfig) -> None:
    """Refuse impossible requests before the minutes of export work."""
    check_output_folder(bundle, "-o", run_dir, cfg.overwrite, bundle_problem)
    if cfg.trt is not None:
        if not cfg.fp16:
            raise UserError("--trt builds the engine from model.fp16.onnx; drop --no-fp16")
        cfg.trt.validate()
        require_tensorrt()
    if cfg.int8 is not None:
        cfg.int8.validate()
    if cfg.triton is not None:
        triton = Path(cfg.triton)
        check_model_name(cfg.triton_model_name)
        check_output_folder(triton, "--triton", run_dir, cfg.overwrite, repository_problem)
        a, b = triton.resolve(), bundle.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise UserError(
                f"--triton {cfg.triton}: the Triton repository must be a folder apart from the bundle"
            )
        if cfg.trt is not None and (cfg.triton_max_batch or 0) > cfg.trt.max_batch:
            raise UserError(
                f"--triton-max-batch {cfg.triton_max_batch} is above the engine's --max-batch "
                f"{cfg.trt.max_batch}; Triton would refuse the TensorRT model"
            )


class _Steps:
    """A bar over the export's steps (each is seconds to minutes), on a terminal only."""

    def __init__(self, names: list[str], show: bool) -> None:
        self.bar = None
        if show and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=len(names), unit="step", leave=False, dynamic_ncols=True)

    def __call__(self, name: str) -> None:
        """Mark the previous step done and show ``name`` as the current one."""
        log.info("%s", name)
        if self.bar is not None:
            if self.bar.desc:
                self.bar.update(1)
            self.bar.set_description_str(name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_bundle(run_dir: Path, bundle: Path, cfg: ExportConfig) -> ExportResult:
    """Export ``run_dir`` into ``bundle``; the folder appears complete or not at all."""
    from crc_train.data import load_split

    run_dir, bundle = Path(run_dir), Path(bundle)
    _preflight(run_dir, bundle, cfg)
    run_cfg, config, ckpt, model = _load_run(run_dir)
    data_cfg = run_cfg.data
    if cfg.data_root is not None:
        data_cfg.root = cfg.data_root
    test = load_split(data_cfg, "test")
    image_size = int(ckpt["image_size"])

    names = ["model.onnx", "reference logits", "parity model.onnx"]
    names += ["model.explain.onnx"] if cfg.explain else []
    names += ["model.fp16.onnx", "parity model.fp16.onnx"] if cfg.fp16 else []
    names += ["model.int8.onnx"] if cfg.int8 is not None else []
    names += ["TensorRT engine"] if cfg.trt is not None else []
    names += ["TensorRT INT8 engine"] if cfg.trt is not None and cfg.int8 is not None else []
    names += ["manifest"] + (["Triton repository"] if cfg.triton is not None else [])
    step = _Steps(names, cfg.progress)
    try:
        with writing(bundle, "-o"), atomic_folder(bundle) as work:
            step("model.onnx")
            onnx_path = export_onnx(
                model,
                work / "model.onnx",
                image_size,
                exporter=cfg.exporter,
                opset=cfg.opset,
                external_data=cfg.external_data,
            )
            check_onnx(onnx_path)
            step("reference logits")
            ref = build_reference(model, test, cfg.parity_pairs, cfg.batch_size)
            write_reference(work / "reference.npz", ref)

            step("parity model.onnx")
            artifacts = [onnx_artifact(onnx_path, "fp32", ref, cfg.thresholds, cfg.batch_size)]
            if cfg.explain:
                step("model.explain.onnx")
                artifacts.append(
                    explain_artifact(
                        model,
                        work,
                        image_size,
                        ref,
                        cfg.thresholds,
                        exporter=cfg.exporter,
                        opset=cfg.opset,
                        batch_size=cfg.batch_size,
                        weights_from=onnx_path if cfg.external_data else None,
                    )
                )
            if cfg.fp16:
                step("model.fp16.onnx")
                fp16_path = export_fp16_onnx(
                    model, work / FP16_FILE, image_size, exporter=cfg.exporter, opset=cfg.opset
                )
                check_onnx(fp16_path)
                step("parity model.fp16.onnx")
                artifacts.append(
                    onnx_artifact(
                        fp16_path, "fp16", ref, cfg.thresholds, cfg.batch_size, device=cfg.fp16_device
                    )
                )
                artifacts[-1]["graph"] = precision_summary(fp16_path)
            if cfg.int8 is not None:
                step("model.int8.onnx")  # calibration, quantization and its parity run
                int8_entry, trt_quantization = _int8_artifact(onnx_path, work, data_cfg, ref, cfg)
                artifacts.append(int8_entry)
            if cfg.trt is not None:
                step("TensorRT engine")
                previous = bundle if bundle.is_dir() else None
                artifacts.append(_engine_artifact(fp16_path, "fp16", work, image_size, ref, cfg, previous))
                if cfg.int8 is not None:
                    step("TensorRT INT8 engine")
                    source = work / INT8_TRT_FILE
                    artifacts.append(_engine_artifact(source, "int8", work, image_size, ref, cfg, previous))
                    artifacts[-1]["quantization"] = trt_quantization
            step("manifest")
            files = dict.fromkeys(  # each file once: an engine's ONNX source may be an artifact too
                [
                    "reference.npz",
                    *(a["file"] for a in artifacts),
                    *(name for a in artifacts for name in a.get("external_data", [])),
                    *(a["timing_cache"] for a in artifacts if "timing_cache" in a),
                    *(a["reference"] for a in artifacts if "reference" in a),
                    *(a["engine"]["source"] for a in artifacts if a.get("kind") == "tensorrt"),  # ONNX built
                ]
            )
            manifest = _manifest(
                ckpt,
                config,
                run_dir,
                ref,
                artifacts,
                image_size,
                files={name: sha256_file(work / name) for name in files},
            )
            write_manifest(work, manifest)
        passed = all(a["parity"]["passed"] for a in artifacts)
        if cfg.triton is not None:
            step("Triton repository")
            max_batch = cfg.triton_max_batch or (
                cfg.trt.max_batch if cfg.trt is not None else TrtConfig.max_batch
            )
            with writing(Path(cfg.triton), "--triton"):
                write_triton_repository(
                    bundle,
                    Path(cfg.triton),
                    manifest,
                    model_name=cfg.triton_model_name,
                    max_batch_size=max_batch,
                    overwrite=cfg.overwrite,
                )
    finally:
        step.close()
    return ExportResult(bundle=bundle, manifest=manifest, passed=passed)


def _manifest(
    ckpt: dict,
    config: dict,
    run_dir: Path,
    ref: dict,
    artifacts: list[dict],
    image_size: int,
    files: dict[str, str],
) -> dict:
    classes = list(ckpt["classes"])
    model_cfg = ckpt["model_config"]
    labels, logits = ref["labels"], ref["logits"]
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "architecture": "dual-resnet",
            "backbone": model_cfg.get("backbone"),
            "fusion": model_cfg.get("fusion"),
            "image_size": image_size,
        },
        "classes": classes,
        "inputs": [
            {
                "name": "pathology",
                "dtype": "uint8",
                "shape": ["batch", image_size, image_size, 3],
                "color_mode": "RGB",
            },
            {
                "name": "radiology",
                "dtype": "uint8",
                "shape": ["batch", image_size, image_size, 1],
                "color_mode": "L",
            },
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(classes)]}],
        "resize": {
            "library": "Pillow",
            "filter": "BILINEAR",
            "size": [image_size, image_size],
            "when": "the decoded image is not already size x size",
        },
        "files": files,
        "artifacts": artifacts,
        "reference": {
            "file": "reference.npz",
            "pairs": int(len(labels)),
            "split": "test",
            "accuracy": float((logits.argmax(1) == labels).mean()),
        },
        "provenance": {
            "run_id": ckpt.get("run_id") or config.get("run_id"),
            "run_dir": str(run_dir.resolve()),
            "git_commit": _git_commit(),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
        },
    }
