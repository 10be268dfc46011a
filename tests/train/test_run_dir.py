"""`--out` into an existing folder, `--overwrite`, and Ctrl-C.

Issue 12, item 6: `crc-train --out DIR` into an existing folder overwrote a user's config.json /
metrics.csv; into an existing run dir with other settings it left the old report.md and
test_predictions.npz beside a new config. Ctrl-C printed "error: aborted" and exited 1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crc_train.cli import main
from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.rundir import RUN_FILES, RunDirError, check_run_dir
from crc_train.training import train


def _cfg(root: Path, out: Path, fusion: str = "none") -> RunConfig:
    return RunConfig(
        model=ModelConfig(backbone="resnet18", fusion=fusion, image_size=28, attention_dim=32),
        data=DataConfig(root=str(root), max_train_pairs=8),
        train=TrainConfig(
            epochs=1, batch_size=4, device="cpu", seed=0, progress=False, evaluate=False, out=str(out)
        ),
    )


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_users_folder_is_refused_and_left_alone(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "metrics.csv").write_text("my,numbers\n")
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    for overwrite in (False, True):
        with pytest.raises(RunDirError) as err:
            train(_cfg(synthetic_root, out), overwrite=overwrite)
        assert "notes.txt" in str(err.value) and "did not write" in str(err.value)
        assert _snapshot(out) == before


def test_a_run_dir_needs_overwrite_or_resume(small_run, clone_run, synthetic_root: Path) -> None:
    run = clone_run(small_run)
    before = _snapshot(run)
    with pytest.raises(RunDirError) as err:
        train(_cfg(synthetic_root, run))
    message = str(err.value)
    assert "\n" not in message and "--overwrite" in message and f"--resume {run}" in message
    assert _snapshot(run) == before


def test_overwrite_leaves_no_stale_file_of_the_old_run(small_run, clone_run, synthetic_root: Path) -> None:
    """The old run was evaluated (report.md, test_predictions.npz, figures); the new one is not: none of
    those may survive beside the new config."""
    run = clone_run(small_run)
    for name in ("report.md", "test_predictions.npz", "confusion_matrix.png", "roc_curves.png", "tsne.png"):
        (run / name).write_text("from the old run (attention fusion)")
    (run / ".metrics.csv.abc123.tmp").write_text("left by a killed write")
    old_id = json.loads((run / "config.json").read_text())["run_id"]
    train(_cfg(synthetic_root, run, fusion="none"), overwrite=True)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["fusion"] == "none" and config["run_id"] != old_id
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["config.json", "checkpoint.pt", "last.pt", "metrics.csv", "metrics.json", "training_curves.png"]
    )


def test_check_run_dir_cases(tmp_path: Path) -> None:
    check_run_dir(tmp_path / "new", overwrite=False)  # a new folder
    (tmp_path / "empty").mkdir()
    check_run_dir(tmp_path / "empty", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a folder"):
        check_run_dir(tmp_path / "file", overwrite=True)
    (tmp_path / "sub" / "nested").mkdir(parents=True)
    with pytest.raises(RunDirError, match="nested"):  # a folder inside is never ours
        check_run_dir(tmp_path / "sub", overwrite=True)
    (tmp_path / "run").mkdir()
    for name in RUN_FILES:
        (tmp_path / "run" / name).write_text("x")
    check_run_dir(tmp_path / "run", overwrite=True)


def test_cli_overwrite_flag_and_resume_refuses_it(
    small_run, clone_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = clone_run(small_run)
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(run), "--epochs", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error: --out ") and "--overwrite" in err, err
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(run), "--overwrite"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "drop --overwrite" in err, err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")
def test_ctrl_c_exits_130_with_one_line(synthetic_root: Path, tmp_path: Path, python_c) -> None:
    out = tmp_path / "run"
    args = [
        "--data-root", str(synthetic_root), "--backbone", "resnet18", "--fusion", "none", "--epochs", "50",
        "--batch-size", "4", "--max-train-pairs", "8", "--device", "cpu", "--quiet", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        python_c("from crc_train.cli import main; main()", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    while not (out / "last.pt").exists():  # training is under way (epoch 1 done)
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no last.pt after 600 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]  # click ends the ^C line first
    assert lines == [lines[-1]] and lines[-1].startswith("interrupted: ") and "--resume" in lines[-1], err
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temp files left behind"
