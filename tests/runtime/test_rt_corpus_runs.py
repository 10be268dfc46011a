"""Bad-input corpus, whole runs: outputs that are inputs, two runs on one output, a full disk, NaN logits,
Ctrl-C while loading, errors after the writer exists, the progress bar, bench durations.

Each case was broken by an outside adversarial run (issue 12) and fails on the code before the fix.
"""

from __future__ import annotations

import csv
import errno
import os
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime.cli import cli
from crc_runtime.errors import BackendError, UserError
from PIL import Image


def _run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _one_error_line(code: int, stderr: str, expected: str) -> None:
    assert code == 1, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert expected in stderr, stderr


def _snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- outputs that are inputs


@pytest.fixture
def shared_input(csv_copy: Path) -> Path:
    """The csv example plus a pathology image that is a symlink to another file of the folder."""
    os.symlink("case-1.png", csv_copy / "img" / "pathology" / "alias.png")
    with open(csv_copy / "pairs.csv", "a") as fh:
        fh.write("alias,img/pathology/alias.png,img/radiology/case-1.png,\n")
    return csv_copy


# name: (arguments after FOLDER --bundle BUNDLE, with {folder} {bundle} {tmp}; text of the one line)
OUTPUT_CASES = {
    "--output is pairs.csv": (["--output", "{folder}/pairs.csv"], "a file of the input folder"),
    "--output is an input image": (
        ["--output", "{folder}/img/pathology/case-0.png"],
        "a file of the input folder",
    ),
    "--output is the target of an input symlink": (
        ["--output", "{folder}/img/pathology/case-1.png"],
        "a file of the input folder",
    ),
    "--output is manifest.json": (["--output", "{bundle}/manifest.json"], "a file of the bundle"),
    "--output is model.onnx": (["--output", "{bundle}/model.onnx"], "a file of the bundle"),
    "--report is --output": (
        ["--output", "{tmp}/p.csv", "--report", "{tmp}/p.csv"],
        "--report {tmp}/p.csv: the same file as --output",
    ),
    "--report is OUTPUT.partial": (
        ["--output", "{tmp}/p.csv", "--report", "{tmp}/p.csv.partial"],
        "the same file as --output (or one of its .partial files)",
    ),
    "--report is pairs.csv": (
        ["--output", "{tmp}/p.csv", "--report", "{folder}/pairs.csv"],
        "--report {folder}/pairs.csv: a file of the input folder",
    ),
    "--report is reference.npz": (
        ["--output", "{tmp}/p.csv", "--report", "{bundle}/reference.npz"],
        "a file of the bundle",
    ),
    "--output name too long for .partial.json": (
        ["--output", "{tmp}/" + "x" * 240 + ".csv"],
        "file name too long: crc-infer writes "
        + "x" * 240
        + ".csv and a temporary file of 258 bytes next to "
        "it, over this file system's limit of 255; use a name of at most 228 bytes",
    ),
    "--output name over the file system's limit": (["--output", "{tmp}/" + "y" * 300], "file name too long"),
}


@pytest.mark.parametrize("name", OUTPUT_CASES)
def test_outputs_that_are_inputs_are_refused_before_writing(shared_input, bundle_copy, tmp_path, name):
    """Nothing is written anywhere: pairs.csv, images, bundle and the output folder stay as they were."""
    extra, expected = OUTPUT_CASES[name]
    names = {"folder": shared_input, "bundle": bundle_copy, "tmp": tmp_path / "out"}
    names["tmp"].mkdir()
    before = _snapshot(shared_input, bundle_copy, names["tmp"])
    args = [a.format(**names) for a in extra]
    code, stdout, stderr = _run(shared_input, "--bundle", bundle_copy, *args)
    _one_error_line(code, stderr, expected.format(**names))
    assert _snapshot(shared_input, bundle_copy, names["tmp"]) == before
    assert not list(names["tmp"].iterdir())


def test_bench_report_that_is_a_bundle_file(bundle_copy):
    before = _snapshot(bundle_copy)
    code, _, stderr = _run("bench", "--bundle", bundle_copy, "--report", bundle_copy / "manifest.json")
    _one_error_line(code, stderr, "--report")
    assert "a file of the bundle" in stderr and _snapshot(bundle_copy) == before


def test_output_that_is_a_symlink_to_an_input_replaces_the_link(shared_input, tiny, tmp_path):
    """The link itself is replaced (atomic rename), never the file it points to: allowed."""
    link = tmp_path / "p.csv"
    link.symlink_to(shared_input / "pairs.csv")
    before = (shared_input / "pairs.csv").read_bytes()
    code, stdout, stderr = _run(shared_input, "--bundle", tiny.bundle, "--output", link)
    assert code == 0, stdout + stderr
    assert not link.is_symlink() and (shared_input / "pairs.csv").read_bytes() == before


# ---------------------------------------------------------------- two runs on one output


def test_second_run_on_the_same_output_fails_fast(tiny, tmp_path, many_pairs, start_run, crc_infer_command):
    """Run A holds OUTPUT.partial (stopped mid-run with SIGSTOP, so the timing is certain); run B with the
    same --output stops at once with one line; A then finishes with every row it wrote."""
    folder = tmp_path / "in"
    folder.mkdir()
    many_pairs(folder, 300)
    out = tmp_path / "p.csv"
    first, args = start_run(folder, out)
    try:
        first.send_signal(signal.SIGSTOP)
        rows_before = (tmp_path / "p.csv.partial").read_bytes()
        second = subprocess.run(crc_infer_command(args), capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert second.stderr == (
            f"error: {out}.partial: another crc-infer run is writing its predictions there now; wait for it "
            "to finish or pass another --output\n"
        )
        assert (tmp_path / "p.csv.partial").read_bytes() == rows_before  # B wrote nothing
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert first.returncode == 0, stderr
    with open(out, newline="") as fh:
        assert len(list(csv.reader(fh))) == 301
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "p.csv"]


def test_lock_is_released_after_each_run(tiny, csv_copy, tmp_path):
    out = tmp_path / "p.csv"
    for _ in range(2):
        code, stdout, stderr = _run(csv_copy, "--bundle", tiny.bundle, "--output", out)
        assert code == 0, stdout + stderr


# ---------------------------------------------------------------- a full disk mid-run


def test_file_size_limit_mid_run_then_resume(tiny, tmp_path, many_pairs, crc_infer_command):
    """A real process whose writes fail part-way (RLIMIT_FSIZE: EFBIG, as ENOSPC on a full disk): one
    line, the partial holds whole batches only, and --resume without the limit gives the bytes of a clean
    run."""
    folder = tmp_path / "in"
    folder.mkdir()
    many_pairs(folder, 200)
    out = tmp_path / "p.csv"
    args = [folder, "--bundle", tiny.bundle, "--batch-size", "7", "--device", "cpu", "--output", out]
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000)); "
    full = subprocess.run(crc_infer_command(args, limit), capture_output=True, text=True, timeout=120)
    assert full.returncode == 1, full.stderr
    partial = (tmp_path / "p.csv.partial").read_bytes()
    assert 0 < len(partial) <= 6000 and partial.endswith(b"\n")
    rows = partial.count(b"\n") - 1
    assert rows % 7 == 0  # whole batches only: the torn one was cut off
    assert full.stderr == (
        f"error: {out}.partial: cannot write predictions (file too large), make room; {rows} rows kept in "
        f"{out}.partial; run the same command with --resume to continue\n"
    )
    assert not out.exists()

    resumed = subprocess.run(
        crc_infer_command([*args, "--resume"]), capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"{rows} already in p.csv.partial (resumed)" in resumed.stdout
    clean = tmp_path / "clean.csv"
    code, stdout, _ = _run(*args[:-1], clean)
    assert code == 0 and out.read_bytes() == clean.read_bytes(), stdout


def test_no_space_left_in_process(tiny, csv_copy, tmp_path, monkeypatch):
    import crc_runtime.predictions as predictions

    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) > 2:  # the header and the first batch go through, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(predictions.os, "write", write)
    out = tmp_path / "p.csv"
    code, _, stderr = _run(csv_copy, "--bundle", tiny.bundle, "--batch-size", 2, "--output", out)
    _one_error_line(
        code, stderr, "cannot write predictions (no space left on device), make room; 2 rows kept"
    )
    monkeypatch.undo()
    code, stdout, _ = _run(csv_copy, "--bundle", tiny.bundle, "--batch-size", 2, "--output", out, "--resume")
    assert code == 0 and "4 processed, 2 already in p.csv.partial" in stdout, stdout


# ---------------------------------------------------------------- NaN logits


def _dark_and_bright(root: Path) -> Path:
    """Two dark pathology tiles (mean 20: NaN logits with nan_bundle(128)) and three bright ones."""
    for modality in ("pathology", "radiology"):
        (root / modality).mkdir(parents=True)
    for name, value in (("d1", 20), ("b1", 230), ("d2", 20), ("b2", 230), ("b3", 230)):
        Image.new("RGB", (8, 8), (value,) * 3).save(root / "pathology" / f"{name}.png")
        Image.new("L", (8, 8), 100).save(root / "radiology" / f"{name}.png")
    return root


def test_nan_logits_rows_are_refused_not_predicted(nan_bundle, tmp_path):
    folder = _dark_and_bright(tmp_path / "in")
    out = tmp_path / "p.csv"
    code, stdout, stderr = _run(folder, "--bundle", nan_bundle(128), "--output", out)
    assert code == 3, stdout + stderr
    assert "pairs: 3 processed, 2 skipped" in stdout and "skipped by reason: non-finite logits 2" in stdout
    assert "skipped d1: the model gave NaN or infinite logits for this pair" in stdout
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert [r[0] for r in rows[1:]] == ["b1", "b2", "b3"]
    assert all(np.isfinite([float(x) for x in r[2:11]]).all() for r in rows[1:])


def test_all_nan_logits_is_nothing_processed(nan_bundle, tiny, tmp_path):
    out = tmp_path / "p.csv"
    code, _, stderr = _run(tiny.csv_dir, "--bundle", nan_bundle(256), "--output", out)
    _one_error_line(code, stderr, "no pair could be processed (6 skipped")
    assert "NaN or infinite logits" in stderr and not list(tmp_path.glob("p.csv*"))


def test_validate_fails_on_nan_logits(nan_bundle):
    result = CliRunner().invoke(cli, ["validate", str(nan_bundle(256))])
    assert result.exit_code == 1, result.output
    assert "model.onnx: fp32 20 of 20 rows of logits are NaN or infinite" in result.output
    assert result.output.rstrip().endswith("FAILED: 1 artifact(s) failed")


def test_parity_gate_fails_nan_rows_that_agree(tiny):
    """An agreement-only gate (FP16's) passed NaN rows whose argmax happened to match."""
    from crc_runtime.bundle import load_bundle
    from crc_runtime.validate import parity_row

    ref = load_bundle(tiny.bundle).load_reference()
    logits = ref["logits"].copy()
    logits[3, ref["logits"][3].argmax()] = np.inf  # still the same argmax: it "agrees"
    row_result = parity_row(ref, logits, "fp16", {"min_top1_agreement": 0.9})
    assert row_result["top1_agreement"] == 1.0 and row_result["passed"] is False
    assert row_result["reasons"][0] == "fp16 1 of 20 rows of logits are NaN or infinite"


# ---------------------------------------------------------------- Ctrl-C while loading; errors mid-run


@pytest.mark.parametrize("command", ["run", "validate", "bench"])
def test_ctrl_c_while_the_bundle_loads(tiny, tmp_path, monkeypatch, command):
    import crc_runtime.bundle as bundle_module

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "load_bundle", interrupted)
    args = {
        "run": [tiny.csv_dir, "--bundle", tiny.bundle, "--output", tmp_path / "p.csv"],
        "validate": ["validate", tiny.bundle],
        "bench": ["bench", "--bundle", tiny.bundle],
    }[command]
    code, stdout, stderr = _run(*args)
    assert (code, stderr) == (130, "interrupted\n"), stdout + stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fail_at_call", [1, 3])
def test_backend_error_after_the_writer_exists(tiny, tmp_path, monkeypatch, fail_at_call):
    """No rows yet: OUTPUT.partial and .partial.json are removed. Rows written: kept, and the line says
    how to resume."""
    from crc_runtime.backends.onnxruntime import OrtBackend

    real, calls = OrtBackend.infer, []

    def infer(self, inputs):
        calls.append(1)
        if len(calls) == fail_at_call:
            raise BackendError("CUDA error: an illegal memory access was encountered")
        return real(self, inputs)

    monkeypatch.setattr(OrtBackend, "infer", infer)
    out = tmp_path / "p.csv"
    code, _, stderr = _run(tiny.csv_dir, "--bundle", tiny.bundle, "--batch-size", 2, "--output", out)
    _one_error_line(code, stderr, "error: CUDA error: an illegal memory access was encountered")
    if fail_at_call == 1:
        assert not list(tmp_path.iterdir())
    else:
        assert "; 4 rows kept in" in stderr and "run the same command with --resume" in stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv.partial", "p.csv.partial.json"]


# ---------------------------------------------------------------- progress bar


def _on_a_terminal(args: list, crc_infer_command) -> str:
    """Run crc-infer with stderr on a pseudo-terminal; returns what it wrote there."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(crc_infer_command(args), stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.1)
        if ready:
            try:
                data = os.read(leader, 4096)
            except OSError:  # the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(30)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_only(tiny, tmp_path, many_pairs, crc_infer_command):
    folder = tmp_path / "in"
    folder.mkdir()
    many_pairs(folder, 60)
    args = [folder, "--bundle", tiny.bundle, "--batch-size", 4, "--device", "cpu"]
    shown = _on_a_terminal([*args, "--output", tmp_path / "a.csv"], crc_infer_command)
    assert "predicting" in shown and "60/60" in shown, shown
    assert _on_a_terminal([*args, "--output", tmp_path / "b.csv", "--quiet"], crc_infer_command) == ""
    piped = subprocess.run(
        crc_infer_command([*args, "--output", tmp_path / "c.csv"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode == 0 and piped.stderr == ""  # not a terminal: nothing, not even a label


# ---------------------------------------------------------------- bench durations and counts


@pytest.mark.parametrize(
    "args",
    [
        ["--duration", "nan"],
        ["--duration", "inf"],
        ["--duration", "-1"],
        ["--duration", "0"],
        ["--duration", "1e300"],
        ["--duration", "three"],
        ["--iterations", "0"],
        ["--iterations", "-5"],
        ["--warmup-iters", "-1"],
    ],
    ids=" ".join,
)
def test_bench_durations_and_counts_are_checked_up_front(tiny, args):
    result = CliRunner().invoke(cli, ["bench", "--bundle", str(tiny.bundle), "--batch-sizes", "1", *args])
    assert result.exit_code == 2 and "Invalid value for" in result.stderr, result.output
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("duration", [float("nan"), float("inf"), 0.0, -1.0])
def test_run_bench_refuses_endless_durations(tiny, duration):
    from crc_runtime.backends.onnxruntime import OrtBackend
    from crc_runtime.bench import run_bench

    with OrtBackend(tiny.bundle / "model.onnx") as backend, pytest.raises(UserError, match="not a duration"):
        run_bench(backend, [1], warmup_iters=0, duration=duration)


def test_bench_short_duration_still_runs(tiny):
    code, stdout, stderr = _run("bench", "--bundle", tiny.bundle, "--batch-sizes", "1", "--duration", "0.01")
    assert code == 0 and "0.01 s of timed calls" in stdout, stdout + stderr
