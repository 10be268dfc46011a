"""Where crc-export may write, what `--overwrite` may replace, and bad run files: one line, exit 1.

Issue 12, item 3: `crc-export RUN -o RUN --overwrite` deleted the run dir, and `-o PARENT --overwrite`
deleted a sibling run and an unrelated file. Also: `-o` an existing file or an unwritable parent, a
non-UTF-8 / wrong-shaped config.json, a damaged checkpoint gave tracebacks; Ctrl-C printed "Aborted!"
and exited 1.

Every run here is a hard-link clone of the session's tiny run (``clone_run``), so code that wrongly
deletes it (as the old one did) cannot take the other tests' run with it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from crc_export.cli import export_command
from crc_export.outputs import bundle_problem
from crc_export.triton import repository_problem


def _export(*args: str):
    return CliRunner().invoke(export_command, [*args, "--no-fp16", "--no-explain", "--parity-pairs", "8"])


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- -o and --triton targets


def test_o_run_dir_overwrite_leaves_the_run(tiny_run: Path, clone_run) -> None:
    run = clone_run(tiny_run)
    before = _tree(run)
    _one_line_error(_export(str(run), "-o", str(run), "--overwrite"), "is the run dir")
    assert _tree(run) == before


def test_o_parent_overwrite_leaves_every_sibling(tiny_run: Path, clone_run, tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    parent.mkdir()
    run = Path(shutil.move(clone_run(tiny_run), parent / "mine"))
    sibling = Path(shutil.move(clone_run(tiny_run), parent / "sibling"))
    (parent / "notes.txt").write_text("unrelated")
    before = _tree(parent)
    _one_line_error(_export(str(run), "-o", str(parent), "--overwrite"), "holds the run dir")
    _one_line_error(_export(str(run), "-o", str(tmp_path), "--overwrite"), "holds the run dir")
    assert _tree(parent) == before and sibling.is_dir()


def test_o_an_existing_file(tiny_run: Path, clone_run, tmp_path: Path) -> None:
    run = clone_run(tiny_run)
    target = tmp_path / "bundle.zip"
    target.write_text("mine")
    for extra in ([], ["--overwrite"]):
        _one_line_error(_export(str(run), "-o", str(target), *extra), "not a folder")
    assert target.read_text() == "mine"
    # A run-dir file as -o: the same refusal, nothing touched.
    _one_line_error(_export(str(run), "-o", str(run / "checkpoint.pt"), "--overwrite"), "not a folder")


def test_o_an_unwritable_parent(tiny_run: Path, clone_run, tmp_path: Path) -> None:
    run = clone_run(tiny_run)
    if os.geteuid() == 0:  # root ignores folder modes; /sys takes no new entry from anyone
        target = Path("/sys/crc-fusion-test/bundle")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "bundle"
    try:
        _one_line_error(_export(str(run), "-o", str(target)), "cannot write -o", str(target))
    finally:
        if os.geteuid() != 0:
            (tmp_path / "locked").chmod(0o755)
    assert not target.exists()


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(tiny_run: Path, clone_run, tmp_path: Path) -> None:
    run = clone_run(tiny_run)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    _one_line_error(_export(str(run), "-o", str(mine), "--overwrite"), "no manifest.json")
    (mine / "manifest.json").write_text(json.dumps({"name": "my project", "files": ["a"]}))
    _one_line_error(_export(str(run), "-o", str(mine), "--overwrite"), "not a crc-export manifest")
    assert sorted(p.name for p in mine.iterdir()) == ["manifest.json", "notes.txt"]


def test_overwrite_refuses_a_bundle_holding_other_files(full_bundle, tiny_run, clone_run, tmp_path) -> None:
    bundle = Path(shutil.copytree(full_bundle[0], tmp_path / "bundle"))
    assert bundle_problem(bundle) is None
    (bundle / "notes.txt").write_text("mine")
    message = _one_line_error(_export(str(clone_run(tiny_run)), "-o", str(bundle), "--overwrite"))
    assert "does not list (notes.txt)" in message
    assert (bundle / "notes.txt").read_text() == "mine" and (bundle / "manifest.json").is_file()


def test_triton_targets(full_bundle, tiny_run: Path, clone_run, tmp_path: Path) -> None:
    run = clone_run(tiny_run)
    before = _tree(run)
    out = str(tmp_path / "new-bundle")
    _one_line_error(_export(str(run), "-o", out, "--triton", str(run), "--overwrite"), "--triton", "run dir")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    _one_line_error(_export(str(run), "-o", out, "--triton", str(mine), "--overwrite"), "data.csv")
    inside = str(tmp_path / "new-bundle" / "triton")
    _one_line_error(_export(str(run), "-o", out, "--triton", inside), "apart from the bundle")
    assert _tree(run) == before and (mine / "data.csv").is_file() and not Path(out).exists()


def test_repository_problem_knows_our_repositories(full_bundle, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(full_bundle[1], tmp_path / "repo"))
    assert repository_problem(repo) is None
    (repo / "crc_fusion_onnx" / "1" / "notes.txt").write_text("mine")
    assert "1 holds other files" in repository_problem(repo)
    (repo / "crc_fusion_onnx" / "1" / "notes.txt").unlink()
    config = repo / "crc_fusion_onnx" / "config.pbtxt"
    original = config.read_text()
    config.write_text(original.replace('name: "crc_fusion_onnx"', 'name: "other"'))
    assert "not written by crc-export" in repository_problem(repo)
    config.write_text(original)
    (repo / "my_model").mkdir()
    assert "my_model" in repository_problem(repo)


def test_overwrite_replaces_a_bundle_and_repository_crc_export_wrote(
    full_bundle, tiny_run: Path, clone_run, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(full_bundle[0], tmp_path / "bundle"))
    repo = Path(shutil.copytree(full_bundle[1], tmp_path / "triton"))
    result = _export(str(clone_run(tiny_run)), "-o", str(bundle), "--triton", str(repo), "--overwrite")
    assert result.exit_code == 0, result.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [a["file"] for a in manifest["artifacts"]] == ["model.onnx"]  # --no-fp16 this time
    assert sorted(p.name for p in repo.iterdir()) == ["crc_fusion_onnx"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- the run's files


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"data": {"root": "caf\xe9"}}', "not UTF-8"),
        (b'[{"model": {}}]', "must be an object"),
        (b'{"model": {"backbone": "resnet18"}, "train": {"lr": "0.001"}}', "train.lr must be a number"),
        (b'{"data": "synthetic"}', "data must be an object"),
    ],
    ids=["not-utf8", "a-list", "lr-as-text", "section-as-text"],
)
def test_bad_config_json(tiny_run: Path, clone_run, tmp_path: Path, content: bytes, words: str) -> None:
    run = clone_run(tiny_run)
    (run / "config.json").unlink()
    (run / "config.json").write_bytes(content)
    _one_line_error(_export(str(run), "-o", str(tmp_path / "b")), str(run / "config.json"), words)
    assert not (tmp_path / "b").exists()


def test_checkpoint_missing_a_tensor(tiny_run: Path, clone_run, tmp_path: Path) -> None:
    run = clone_run(tiny_run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    del ckpt["state_dict"]["head.1.bias"]
    (run / "checkpoint.pt").unlink()
    torch.save(ckpt, run / "checkpoint.pt")
    _one_line_error(_export(str(run), "-o", str(tmp_path / "b")), "checkpoint.pt", "lacks head.1.bias")


def test_checkpoint_field_of_the_wrong_type(tiny_run: Path, clone_run, tmp_path: Path) -> None:
    run = clone_run(tiny_run)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["image_size"] = "28"
    (run / "checkpoint.pt").unlink()
    torch.save(ckpt, run / "checkpoint.pt")
    _one_line_error(_export(str(run), "-o", str(tmp_path / "b")), "checkpoint.pt", "image_size")


@pytest.mark.parametrize(
    "flags",
    [
        ["--fp32-max-abs-diff", "nan"],
        ["--fp32-max-abs-diff", "inf"],
        ["--fp16-min-agreement", "nan"],
        ["--fp16-max-accuracy-delta", "nan"],
        ["--threshold", "fp16.min_cosine=nan"],
        ["--threshold", "fp32.max_abs_diff=inf"],
    ],
    ids=lambda f: " ".join(f),
)
def test_non_finite_thresholds_are_refused(tmp_path: Path, flags: list[str]) -> None:
    result = _export(str(tmp_path / "run"), "-o", str(tmp_path / "b"), *flags)
    assert result.exit_code == 2 and "finite" in result.output, result.output


def test_a_full_disk_mid_export_is_one_line(tiny_run, clone_run, tmp_path, monkeypatch) -> None:
    import crc_export.build as build

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build, "export_onnx", no_space)
    out = tmp_path / "b"
    _one_line_error(_export(str(clone_run(tiny_run)), "-o", str(out)), "No space left on device")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_exits_130_and_leaves_nothing(tiny_run: Path, clone_run, tmp_path: Path, python_c) -> None:
    run, out = clone_run(tiny_run), tmp_path / "bundle"
    proc = subprocess.Popen(
        python_c("from crc_export.cli import main; main()", run, "-o", out, "-v", "--no-fp16"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline, seen = time.monotonic() + 600, []
    for line in proc.stderr:  # -v logs each step; the first one is the ONNX export
        seen.append(line)
        if "model.onnx" in line:
            break
        assert time.monotonic() < deadline, "no export step logged after 600 s"
    assert proc.poll() is None, "".join(seen)
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted: " in rest and "Traceback" not in rest, rest
    assert not out.exists() and not [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
