"""crc-infer end to end on the tiny bundle, and proof that it runs with torch absent."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap

from click.testing import CliRunner
from crc_runtime.bundle import load_bundle
from crc_runtime.cli import cli
from crc_runtime.validate import validate_bundle


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_both_commands():
    result = _run("--help")
    assert result.exit_code == 0
    assert "validate" in result.output and "run" in result.output and "FOLDER --bundle" in result.output


def test_infer_csv_folder(tiny, csv_copy):
    result = _run(csv_copy, "--bundle", tiny.bundle, "--batch-size", 4, "--device", "cpu", "--threads", 1)
    assert result.exit_code == 0, result.output
    with open(csv_copy / "predictions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == [
        "id",
        "predicted",
        "prob_adipose",
        "prob_background",
        "prob_debris",
        "prob_lymphocytes",
        "prob_mucus",
        "prob_smooth_muscle",
        "prob_normal_colon_mucosa",
        "prob_cancer_associated_stroma",
        "prob_colorectal_adenocarcinoma_epithelium",
        "label",
        "correct",
    ]
    assert len(rows) == 1 + len(tiny.expected)
    for row in rows[1:]:
        predicted, label = tiny.expected[row[0]]
        assert row[1] == predicted and row[-2] == label and row[-1] == str(int(predicted == label))
        assert abs(sum(float(x) for x in row[2:11]) - 1.0) < 1e-4
    out = result.output
    assert "pairs: 6 processed, 0 skipped" in out
    assert "accuracy: 66.67% on 6 labelled pairs" in out
    assert "pairs/s end-to-end" in out
    assert "p50" in out and "p95" in out and "p99" in out and "ort-cpu" in out and "batch size 4" in out


def test_infer_folders_with_a_bad_image(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny.folders_dir, tmp_path / "in")
    (folder / "pathology" / "case-2.png").write_bytes(b"junk")
    (folder / "radiology" / "lonely.png").write_bytes(b"junk")
    out_csv = tmp_path / "preds.csv"
    result = _run("run", folder, "--bundle", tiny.bundle, "--device", "cpu", "--output", out_csv)
    assert result.exit_code == 3, result.output  # finished, but some inputs were skipped
    assert "pairs: 5 processed, 2 skipped" in result.output
    assert "case-2.png: cannot decode" in result.output and "lonely.png" in result.output
    assert "accuracy" not in result.output
    rows = list(csv.reader(open(out_csv, newline="")))
    assert len(rows) == 6 and all(r[-1] == "" and r[-2] == "" for r in rows[1:])


def test_user_errors_exit_1_one_line(tiny, tmp_path, cuda_ep):
    result = CliRunner().invoke(cli, [str(tmp_path), "--bundle", str(tmp_path / "nope")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    if cuda_ep == "works":
        return  # --device cuda would run
    result = CliRunner().invoke(cli, [str(tiny.csv_dir), "--bundle", str(tiny.bundle), "--device", "cuda"])
    expected = "available providers" if cuda_ep == "absent" else "installed but did not start"
    assert result.exit_code == 1 and expected in result.output


def test_validate_passes(tiny):
    result = _run("validate", tiny.bundle, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "top-1 agreement" in result.output and "model.onnx" in result.output
    assert result.output.strip().splitlines()[-1].startswith("PASSED")


def test_validate_fails_on_wrong_reference(bundle_copy, edit_manifest):
    import numpy as np
    from crc_runtime.bundle import sha256_file

    with np.load(bundle_copy / "reference.npz") as data:
        ref = dict(data)
    ref["logits"] = ref["logits"] + np.float32(0.01)
    np.savez(bundle_copy / "reference.npz", **ref)
    edit_manifest(
        bundle_copy,
        lambda m: m["files"].update({"reference.npz": sha256_file(bundle_copy / "reference.npz")}),
    )
    result = CliRunner().invoke(cli, ["validate", str(bundle_copy)])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "would pass with max_abs_diff >=" in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAILED")


BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "crc_train", "crc_export")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    from crc_runtime.cli import main

    for argv in (
        ["crc-infer", "--help"],
        ["crc-infer", FOLDER, "--bundle", BUNDLE, "--output", OUT, "--device", "cpu"],
        ["crc-infer", "validate", BUNDLE],
    ):
        sys.argv = argv
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), (argv, exc.code)
    leaked = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
    assert not leaked, leaked
    print("TORCH-FREE OK")
    """
)


def test_runs_with_torch_absent(tiny, tmp_path):
    out = tmp_path / "p.csv"
    code = f"FOLDER, BUNDLE, OUT = {str(tiny.csv_dir)!r}, {str(tiny.bundle)!r}, {str(out)!r}\n" + BLOCK_TORCH
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH-FREE OK" in proc.stdout and "Usage: crc-infer" in proc.stdout and "PASSED" in proc.stdout
    assert len(out.read_text().splitlines()) == 1 + len(tiny.expected)


def test_unusable_artifact_refused_by_cli(tiny, tmp_path, bundle_copy, edit_manifest):
    def mark(m):
        m["artifacts"][0]["usable"] = False
        m["artifacts"][0]["parity"]["reasons"] = ["fp32 abs_diff 0.2 > max_abs_diff 0.001"]

    edit_manifest(bundle_copy, mark)
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(bundle_copy), "--output", str(tmp_path / "p.csv")]
    )
    assert (
        result.exit_code == 1 and "marked unusable" in result.output and "max_abs_diff 0.001" in result.output
    )
    result = CliRunner().invoke(cli, ["validate", str(bundle_copy)])
    assert (
        result.exit_code == 1 and "skipped" in result.output and "no artifact could be run" in result.output
    )


def test_non_onnx_artifact_and_bad_output(tiny, tmp_path, bundle_copy, edit_manifest):
    (bundle_copy / "gpu.plan").write_bytes(b"engine")
    from crc_runtime.bundle import sha256_file

    def add_plan(m):
        m["files"]["gpu.plan"] = sha256_file(bundle_copy / "gpu.plan")
        m["artifacts"].append({"file": "gpu.plan", "kind": "tensorrt", "precision": "fp16", "usable": True})

    edit_manifest(bundle_copy, add_plan)
    result = CliRunner().invoke(
        cli,
        [str(tiny.csv_dir), "--bundle", str(bundle_copy), "--artifact", "gpu.plan", "--backend", "ort-cpu"],
    )
    assert result.exit_code == 1 and "gpu.plan" in result.output and "no backend" in result.output
    # With auto, an engine named by --artifact selects the TensorRT backend, which cannot start here.
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(bundle_copy), "--artifact", "gpu.plan"]
    )
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "tensorrt" in result.output.lower()
    result = CliRunner().invoke(
        cli, [str(tiny.csv_dir), "--bundle", str(bundle_copy), "--output", str(tmp_path)]
    )
    assert result.exit_code == 1 and "--output" in result.output
    # validate tries the engine on the TensorRT backend; with no TensorRT / GPU here it is skipped with
    # the backend's reason, and the ONNX artifact still passes.
    result = _run("validate", bundle_copy)
    assert result.exit_code == 0 and "gpu.plan" in result.output and "skipped" in result.output
    rows = validate_bundle(load_bundle(bundle_copy), device="auto", batch_size=8)
    (plan_row,) = [r for r in rows if r["artifact"] == "gpu.plan"]
    assert plan_row["passed"] is None and plan_row["reasons"][0].startswith("cannot run here: ")
    assert "tensorrt" in plan_row["reasons"][0].lower()


def _shift_reference(bundle, edit_manifest, by: float, thresholds: dict | None) -> None:
    """Move reference.npz's logits by ``by`` and record ``thresholds`` for model.onnx in the manifest."""
    import numpy as np
    from crc_runtime.bundle import sha256_file

    with np.load(bundle / "reference.npz") as data:
        ref = dict(data)
    ref["logits"] = ref["logits"] + np.float32(by)
    np.savez(bundle / "reference.npz", **ref)

    def edit(m):
        m["files"]["reference.npz"] = sha256_file(bundle / "reference.npz")
        m["artifacts"][0]["parity"]["thresholds"] = thresholds

    edit_manifest(bundle, edit)


def test_validate_gates_with_the_thresholds_recorded_in_the_manifest(bundle_copy, edit_manifest):
    """Exported with a looser max_abs_diff (0.05): a 0.01 difference passes, as it did in crc-export."""
    _shift_reference(bundle_copy, edit_manifest, 0.01, {"min_top1_agreement": 1.0, "max_abs_diff": 0.05})
    result = _run("validate", bundle_copy)
    assert result.exit_code == 0, result.output
    assert "thresholds from manifest: min_top1_agreement 1, max_abs_diff 0.05" in result.output
    # The command line overrides the manifest, key by key.
    result = CliRunner().invoke(cli, ["validate", str(bundle_copy), "--threshold", "fp32.max_abs_diff=0.001"])
    assert result.exit_code == 1 and "would pass with max_abs_diff >=" in result.output
    assert "thresholds from manifest + command line (max_abs_diff)" in result.output
    bad = CliRunner().invoke(cli, ["validate", str(bundle_copy), "--threshold", "fp32.top1=1"])
    assert bad.exit_code == 2 and "PRECISION.KEY=VALUE" in bad.output


def test_validate_fails_what_the_manifest_thresholds_fail(bundle_copy, edit_manifest):
    """Exported with a tighter max_abs_diff (1e-4): 5e-4 passes the default 1e-3 but not the manifest."""
    _shift_reference(bundle_copy, edit_manifest, 5e-4, {"min_top1_agreement": 1.0, "max_abs_diff": 1e-4})
    result = CliRunner().invoke(cli, ["validate", str(bundle_copy)])
    assert result.exit_code == 1 and "max_abs_diff 0.0001" in result.output
    assert result.output.strip().splitlines()[-1].startswith("FAILED")


def test_validate_refuses_unreadable_recorded_thresholds(bundle_copy, edit_manifest):
    _shift_reference(bundle_copy, edit_manifest, 0.0, {"max_abs_diff": "tiny"})
    result = CliRunner().invoke(cli, ["validate", str(bundle_copy)])
    # The manifest schema refuses it when the bundle loads, before any artifact runs (run refuses it too).
    assert result.exit_code == 1 and result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "'artifacts[0].parity.thresholds.max_abs_diff' missing or not a finite number" in result.output


def test_a_folder_of_pairs_named_like_a_command_is_the_folder(tiny, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(tiny.csv_dir, tmp_path / "validate")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["validate", "--bundle", str(tiny.bundle), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "note: validate is a folder of image pairs here" in result.output
    assert "pairs: 6 processed" in result.output and (tmp_path / "validate" / "predictions.csv").is_file()


def test_a_command_name_that_is_no_folder_says_how_to_pass_one(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()  # a folder, but not of pairs: the command wins
    result = CliRunner().invoke(cli, ["validate", "--bundle", str(tiny.bundle)])
    assert result.exit_code == 2
    assert "to run on a folder named validate, pass it as: crc-infer run ./validate" in result.output
    bench = ["bench", "--bundle", str(tiny.bundle), "--batch-sizes", "1", "--iterations", "1"]
    result = CliRunner().invoke(cli, [*bench, "--warmup-iters", "0", "--device", "cpu"])
    assert result.exit_code == 0 and "note:" not in result.output and "pairs/s" in result.output
