"""The whole product through its real commands: crc-train -> crc-export -> crc-infer -> crc-infer validate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch", reason="the end-to-end chain needs the [export] extra (torch)")

BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def write_pairs_folder(reference: Path, folder: Path, classes: list[str]) -> int:
    """Turn the bundle's reference pairs into a pairs.csv folder of PNGs, as a user would bring them."""
    with np.load(reference, allow_pickle=False) as ref:
        pathology, radiology, labels = ref["pathology"], ref["radiology"], ref["labels"]
    for sub in ("pathology", "radiology"):
        (folder / sub).mkdir(parents=True)
    rows = []
    for i, (p, r, y) in enumerate(zip(pathology, radiology, labels, strict=True)):
        Image.fromarray(p, "RGB").save(folder / "pathology" / f"case{i:03d}.png")
        Image.fromarray(r[..., 0], "L").save(folder / "radiology" / f"case{i:03d}.png")
        rows.append([f"case{i:03d}", f"pathology/case{i:03d}.png", f"radiology/case{i:03d}.png", classes[y]])
    with open(folder / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["id", "pathology", "radiology", "label"], *rows])
    return len(rows)


def test_train_export_infer_validate(tmp_path):
    run(
        "crc-train",
        "--data-source",
        "synthetic",
        "--data-root",
        str(tmp_path / "data"),
        "--size",
        "28",
        "--backbone",
        "resnet18",
        "--fusion",
        "attention",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--max-train-pairs",
        "64",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "run"
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "metrics.json", "test_predictions.npz"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_test"] > 0 and 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0

    export = run(
        "crc-export", str(run_dir), "-o", str(tmp_path / "bundle"), "--parity-pairs", "20", cwd=tmp_path
    )
    assert export.stdout.strip().splitlines()[-1] == "PASSED"
    bundle = tmp_path / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in ("manifest.json", "model.onnx", "reference.npz"):
        assert (bundle / name).is_file(), name

    n = write_pairs_folder(bundle / "reference.npz", tmp_path / "pairs", manifest["classes"])
    infer = run(
        "crc-infer", str(tmp_path / "pairs"), "--bundle", str(bundle), "--batch-size", "8", cwd=tmp_path
    )
    with open(tmp_path / "pairs" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n
    assert [r["id"] for r in rows] == [f"case{i:03d}" for i in range(n)]
    # The PNG round trip is lossless and 28 px needs no resize, so the runtime must reproduce the
    # reference accuracy that crc-export measured with PyTorch.
    accuracy = np.mean([r["predicted"] == r["label"] for r in rows])
    assert accuracy == pytest.approx(manifest["reference"]["accuracy"])
    assert "accuracy" in infer.stdout and "p95" in infer.stdout

    # --explain: the same predictions from the explain graph, margins that add up, two overlays per pair.
    explained = tmp_path / "explained.csv"
    args = ["--bundle", str(bundle), "--batch-size", "8", "--output", str(explained)]
    run("crc-infer", str(tmp_path / "pairs"), *args, "--explain", str(tmp_path / "why"), cwd=tmp_path)
    with open(explained, newline="") as f:
        explained_rows = list(csv.DictReader(f))
    assert [r["predicted"] for r in explained_rows] == [r["predicted"] for r in rows]
    for r in explained_rows:
        terms = sum(Decimal(r[k]) for k in ("margin_pathology", "margin_radiology", "margin_bias"))
        assert terms == Decimal(r["margin"]) and Decimal(r["margin"]) >= 0
    assert len(list((tmp_path / "why").glob("case*.pathology.png"))) == n
    assert len(list((tmp_path / "why").glob("case*.radiology.png"))) == n

    validate = run("crc-infer", "validate", str(bundle), cwd=tmp_path)
    assert "model.onnx" in validate.stdout and "model.explain.onnx" in validate.stdout
    assert validate.stdout.strip().splitlines()[-1].startswith("PASSED")
