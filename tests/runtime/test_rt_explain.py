"""crc-infer --explain on the tiny bundle's explain graph: margin split, overlays, refusals, no torch."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.bundle import sha256_file
from crc_runtime.cli import cli
from crc_runtime.explain import (
    VIRIDIS,
    explain_parity,
    file_stem,
    identity_error,
    margin_split,
    overlay,
    split_rows,
)
from crc_runtime.images import load_image
from PIL import Image


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _inputs(tiny, pid: str) -> tuple[np.ndarray, np.ndarray]:
    p = load_image(tiny.csv_dir / "img" / "pathology" / f"{pid}.png", "RGB", tiny.size)[None]
    r = load_image(tiny.csv_dir / "img" / "radiology" / f"{pid}.png", "L", tiny.size)[None]
    return p, r


def test_explain_run_margin_split_adds_up_and_overlays_keep_the_input_size(tiny, tiny_explain, tmp_path):
    out, pngs = tmp_path / "pred.csv", tmp_path / "why"
    result = _run(tiny.csv_dir, "--bundle", tiny_explain, "--output", out, "--explain", pngs)
    assert result.exit_code == 0, result.output
    assert "backend: ort-cpu on model.explain.onnx" in result.output
    backend_line = next(line for line in result.output.splitlines() if line.startswith("backend:"))
    assert "--explain" in backend_line and "--artifact" not in backend_line  # the user gave no --artifact
    assert f"explanations: {2 * len(tiny.expected)} overlay PNGs in {pngs}" in result.output
    rows = _rows(out)
    assert list(rows[0])[-7:] == [
        "runner_up",
        "margin",
        "margin_pathology",
        "margin_radiology",
        "margin_bias",
        "label",
        "correct",
    ]
    assert len(rows) == len(tiny.expected)
    for row in rows:
        pid = row["id"]
        # The printed terms add up to the printed margin exactly, digit for digit.
        parts = [Decimal(row[k]) for k in ("margin_pathology", "margin_radiology", "margin_bias")]
        assert sum(parts) == Decimal(row["margin"]), row
        # ... and that margin is the model's: best minus second-best logit of the numpy twin.
        p, r = _inputs(tiny, pid)
        z = tiny.logits(p, r)[0].astype(np.float64)
        order = np.argsort(-z, kind="stable")
        assert row["predicted"] == tiny.expected[pid][0] == tiny.classes[order[0]]
        assert row["runner_up"] == tiny.classes[order[1]]
        assert abs(float(row["margin"]) - (z[order[0]] - z[order[1]])) < 1e-4
        assert float(row["margin_bias"]) == pytest.approx(tiny.bias[order[0]] - tiny.bias[order[1]], abs=1e-6)
        cams = tiny.cams(p, r)
        want_path = cams["pathology_cam"][0, order[0]].mean() - cams["pathology_cam"][0, order[1]].mean()
        assert float(row["margin_pathology"]) == pytest.approx(want_path, abs=1e-4)
        # One overlay per branch, at the size of the image the user gave (not the model's 8x8).
        for branch in ("pathology", "radiology"):
            original = Image.open(tiny.csv_dir / "img" / branch / f"{pid}.png")
            with Image.open(pngs / f"{pid}.{branch}.png") as png:
                assert png.size == original.size and png.mode == "RGB"
    assert sorted(p.name for p in pngs.iterdir()) == sorted(
        f"{pid}.{b}.png" for pid in tiny.expected for b in ("pathology", "radiology")
    )


def test_predictions_without_explain_are_unchanged_by_the_explain_artifact(tiny, tiny_explain, tmp_path):
    """The default run still runs model.onnx and writes the usual columns."""
    out = tmp_path / "pred.csv"
    result = _run(tiny.csv_dir, "--bundle", tiny_explain, "--output", out)
    assert result.exit_code == 0, result.output
    assert "on model.onnx" in result.output
    assert "margin" not in out.read_text().splitlines()[0]


def test_explain_without_the_artifact_is_one_line(tiny, tmp_path):
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(tiny.bundle), "--explain", str(tmp_path)]
    )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "has no explain artifact" in lines[0]
    assert "re-export" in lines[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "trt"], "--explain runs model.explain.onnx on onnxruntime"),
        (["--artifact", "fp16"], "drop --artifact fp16"),
    ],
)
def test_explain_refuses_options_it_cannot_honour(tiny, tiny_explain, tmp_path, extra, message):
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(tiny_explain), "--explain", str(tmp_path / "x"), *extra]
    )
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_explain_folder_that_is_a_file_is_refused(tiny, tiny_explain, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(tiny_explain), "--explain", str(tmp_path / "file")]
    )
    assert result.exit_code != 0 and "file" in result.output


def test_validate_gates_the_explain_maps(tiny_explain, tmp_path):
    result = _run("validate", tiny_explain)
    assert result.exit_code == 0, result.output
    assert "model.explain.onnx" in result.output and "PASSED: 2 artifact(s)" in result.output

    # Reference maps that are spatially flipped: same means, so the logits and the identity still pass,
    # but the maps are not PyTorch's any more.
    bundle = Path(shutil.copytree(tiny_explain, tmp_path / "b"))
    with np.load(bundle / "reference.explain.npz") as data:
        flipped = {k: data[k][..., ::-1, :] for k in data.files}
    np.savez(bundle / "reference.explain.npz", **flipped)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["reference.explain.npz"] = sha256_file(bundle / "reference.explain.npz")
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    result = _run("validate", bundle)
    assert result.exit_code == 1
    assert (
        "cam_cell_abs_diff" in result.output and "would pass with max_cam_cell_abs_diff >=" in result.output
    )


def test_explain_parity_catches_a_broken_identity(tiny):
    rng = np.random.default_rng(1)
    p = rng.integers(0, 256, (4, tiny.size, tiny.size, 3), dtype=np.uint8)
    r = rng.integers(0, 256, (4, tiny.size, tiny.size, 1), dtype=np.uint8)
    logits = tiny.logits(p, r)
    cams = tiny.cams(p, r)
    ref = {"pathology": p, "radiology": r, "labels": logits.argmax(1), "logits": logits}
    outputs = {"logits": logits, **cams, "bias": np.broadcast_to(tiny.bias, logits.shape)}
    limits = {"min_top1_agreement": 1.0, "max_abs_diff": 1e-3}
    good = explain_parity(ref, cams, outputs, ["pathology", "radiology"], limits)
    assert good["passed"] and good["explain"]["identity_max_abs_diff"] < 1e-4
    bad = explain_parity(
        ref, cams, {**outputs, "bias": outputs["bias"] + 0.01}, ["pathology", "radiology"], limits
    )
    assert not bad["passed"] and any("identity_error" in reason for reason in bad["reasons"])


def test_margin_split_terms_ties_and_rounding():
    logits = np.array([[1.0, 3.0, 3.0, -2.0], [0.5, 0.25, 0.0, 0.0]], dtype=np.float32)
    bias = np.array([0.1, -0.2, 0.3, 0.0])
    rng = np.random.default_rng(0)
    cams = {"pathology": rng.normal(size=(2, 4, 3, 5)), "radiology": rng.normal(size=(2, 4, 3, 5))}
    # Make the maps decompose the logits exactly: put the remainder in the radiology maps.
    rest = logits - bias - cams["pathology"].mean(axis=(2, 3)) - cams["radiology"].mean(axis=(2, 3))
    cams["radiology"] += rest[:, :, None, None]
    split = margin_split(logits, cams, bias)
    assert split.predicted.tolist() == [1, 0] and split.runner_up.tolist() == [2, 1]  # tie: lower index wins
    assert split.margin.tolist() == [0.0, 0.25]
    assert split.identity_error.max() < 1e-12
    assert identity_error(logits, cams, np.broadcast_to(bias, logits.shape)).max() < 1e-6
    for row in split_rows(split, ["a", "b", "c", "d"]):
        assert sum(Decimal(x) for x in row[2:]) == Decimal(row[1])
        assert all(len(x.split(".")[1]) == 6 for x in row[1:])


def test_split_rows_print_exact_fixed_point():
    path = np.zeros((1, 2, 1, 1))
    path[0, 0] = 0.1234564
    rad = np.zeros((1, 2, 1, 1))
    rad[0, 0] = -0.25
    split = margin_split(
        np.array([[2.0, 0.0]]), {"pathology": path, "radiology": rad}, np.array([-4e-7, 0.0])
    )
    assert split_rows(split, ["x", "y"]) == [["y", "-0.126544", "0.123456", "-0.250000", "0.000000"]]
    # The margin column is the exact sum of the printed terms, not the float margin rounded on its own.
    assert Decimal("0.123456") + Decimal("-0.250000") + Decimal("0.000000") == Decimal("-0.126544")


def test_overlay_is_the_input_size_and_puts_the_hot_cell_where_it_is():
    image = Image.new("RGB", (30, 20), (200, 150, 180))  # width 30, height 20: not square
    cam = np.zeros((2, 3), dtype=np.float32)
    cam[0, 2] = 5.0  # top row, right column
    out = overlay(image, cam, 0.0, 5.0)
    assert out.size == (30, 20) and out.mode == "RGB"
    pixels = np.asarray(out, dtype=np.float64)
    yellow = pixels[..., 0] + pixels[..., 1] - pixels[..., 2]  # viridis' top end is yellow
    y, x = np.unravel_index(yellow.argmax(), yellow.shape)
    assert y < 10 and x >= 20
    # The tissue stays visible: every pixel is half image, half colour (to the rounding of the blend).
    expected_dark = 0.5 * np.array([200, 150, 180]) + 0.5 * VIRIDIS[0]
    assert np.abs(pixels[-1, 0] - expected_dark).max() <= 1
    gray = overlay(Image.new("L", (9, 9), 40), np.ones((1, 1)), 1.0, 1.0)  # flat map: mid colour
    mid = 0.5 * 40 + 0.5 * VIRIDIS[128]
    assert gray.size == (9, 9) and np.abs(np.asarray(gray)[4, 4] - mid).max() <= 1


def test_viridis_table_is_matplotlibs():
    colormaps = pytest.importorskip("matplotlib").colormaps
    want = np.rint(np.asarray(colormaps["viridis"](np.linspace(0, 1, 256)))[:, :3] * 255)
    assert VIRIDIS.shape == (256, 3) and np.abs(VIRIDIS - want).max() == 0


def test_file_stems_are_safe_and_distinct():
    assert file_stem("adipose-1") == "adipose-1"
    odd = ["a/b", "a_b", "a b", "../x", "", "é"]
    stems = [file_stem(s) for s in odd]
    assert len(set(stems)) == len(stems)
    assert all("/" not in s and not s.startswith(".") and s for s in stems)


def test_explain_runs_with_torch_absent(tiny, tiny_explain, tmp_path):
    out, pngs = tmp_path / "p.csv", tmp_path / "why"
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "crc_train", "crc_export", "matplotlib"):
                    raise ImportError(f"{{name}} is blocked in this test")

        sys.meta_path.insert(0, Block())
        from crc_runtime.cli import main

        sys.argv = ["crc-infer", {str(tiny.csv_dir)!r}, "--bundle", {str(tiny_explain)!r},
                    "--output", {str(out)!r}, "--explain", {str(pngs)!r}]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        print("TORCH-FREE OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE OK" in proc.stdout
    assert len(list(pngs.glob("*.png"))) == 2 * len(tiny.expected)


def test_overlays_are_the_same_drawn_on_threads_or_not(tiny, tiny_explain, tmp_path):
    outputs = {}
    for workers in ("0", "3"):
        pngs = tmp_path / f"why-{workers}"
        args = ["--output", tmp_path / f"p{workers}.csv", "--explain", pngs, "--workers", workers]
        result = _run(tiny.csv_dir, "--bundle", tiny_explain, "--batch-size", "4", *args)
        assert result.exit_code == 0, result.output
        outputs[workers] = {p.name: p.read_bytes() for p in pngs.iterdir()}
    assert outputs["0"] == outputs["3"] and len(outputs["0"]) == 2 * len(tiny.expected)
    assert (tmp_path / "p0.csv").read_text() == (tmp_path / "p3.csv").read_text()


def test_predictor_api_returns_the_maps(tiny, tiny_explain):
    from crc_runtime import Predictor
    from crc_runtime.errors import UserError

    p, r = _inputs(tiny, "case-1")
    with Predictor(tiny_explain, "ort-cpu", explain=True) as predictor:
        assert predictor.artifact["file"] == "model.explain.onnx"
        out = predictor.predict(p, r)
    assert sorted(out.outputs) == ["bias", "pathology_cam", "radiology_cam"]
    np.testing.assert_allclose(out.outputs["pathology_cam"], tiny.cams(p, r)["pathology_cam"], atol=1e-4)
    split = margin_split(
        out.logits, {b: out.outputs[f"{b}_cam"] for b in ("pathology", "radiology")}, out.outputs["bias"]
    )
    assert split.identity_error.max() < 1e-4
    with Predictor(tiny_explain, "ort-cpu") as plain:  # the default: model.onnx, no extra outputs
        assert plain.artifact["file"] == "model.onnx" and plain.predict(p, r).outputs == {}
    with pytest.raises(UserError, match="has no explain artifact"):
        Predictor(tiny.bundle, explain=True)


def test_overlays_never_replace_an_input(tiny_explain, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(folder / "case.pathology.png")
    Image.new("L", (8, 8), 90).save(folder / "slice.png")
    (folder / "pairs.csv").write_text("id,pathology,radiology\ncase,case.pathology.png,slice.png\n")
    before = (folder / "case.pathology.png").read_bytes()
    result = CliRunner().invoke(cli, [str(folder), "--bundle", str(tiny_explain), "--explain", str(folder)])
    assert result.exit_code == 1, result.output
    assert "would replace" in result.output and len(result.output.strip().splitlines()) == 1
    assert (folder / "case.pathology.png").read_bytes() == before
