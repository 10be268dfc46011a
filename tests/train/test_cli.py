"""End-to-end `crc-train` runs on tiny synthetic data, user errors, and the missing-extra message."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from crc_train.rundir import model_from_checkpoint

MISSING_EXTRA = "crc-train needs the training extra: pip install 'crc-fusion[train]'"

# Makes `import torch` fail inside a child interpreter, as if the training extra were not installed.
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("blocked for the test: " + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _crc_train(*args: str) -> subprocess.CompletedProcess:
    # The installed console script when it sits next to this interpreter (the venv), else the same main().
    script = Path(sys.executable).parent / "crc-train"
    launcher = (
        [str(script)]
        if script.is_file()
        else [sys.executable, "-c", "from crc_train.cli import main; main()"]
    )
    cmd = [*launcher, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _tiny_run(data_root: Path, out: Path, epochs: int = 2) -> subprocess.CompletedProcess:
    return _crc_train(
        "--data-source", "synthetic", "--data-root", str(data_root), "--backbone", "resnet18",
        "--fusion", "attention", "--size", "28", "--epochs", str(epochs), "--batch-size", "16",
        "--max-train-pairs", "48", "--seed", "3", "--device", "cpu", "--out", str(out),
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("cli")
    runs = []
    for name in ("a", "b"):
        proc = _tiny_run(base / "data", base / name)
        assert proc.returncode == 0, proc.stderr
        assert "test accuracy" in proc.stdout and str(base / name) in proc.stdout
        runs.append(base / name)
    return runs[0], runs[1]


def test_run_dir_has_every_file(two_runs: tuple[Path, Path]) -> None:
    run = two_runs[0]
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "metrics.json", "test_predictions.npz"):
        assert (run / name).is_file(), name
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temp files left behind"

    config = json.loads((run / "config.json").read_text())
    assert set(config) == {"model", "data", "train", "run_id"}
    assert config["model"]["backbone"] == "resnet18" and config["train"]["epochs"] == 2
    assert config["train"]["out"] == str(run)

    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_test"] == 150 and len(metrics["classes"]) == 9
    assert 1 <= metrics["best_epoch"] <= 2
    assert {"accuracy", "macro_f1", "val_accuracy"} <= set(metrics)

    with np.load(run / "test_predictions.npz", allow_pickle=False) as preds:
        assert preds["labels"].dtype == np.int64 and preds["preds"].dtype == np.int64
        assert preds["probs"].dtype == np.float32 and preds["probs"].shape == (150, 9)
        assert np.isclose((preds["preds"] == preds["labels"]).mean(), metrics["accuracy"])

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["format_version"] == 1 and ckpt["run_id"] == config["run_id"]
    assert ckpt["epoch"] == metrics["best_epoch"] and ckpt["classes"] == metrics["classes"]
    assert ckpt["config"]["train"] == config["train"]
    assert len(ckpt["normalization"]["pathology"]["mean"]) == 3
    model_from_checkpoint(ckpt)


def test_same_seed_gives_identical_metrics(two_runs: tuple[Path, Path]) -> None:
    a, b = (json.loads((run / "metrics.json").read_text()) for run in two_runs)
    for key in ("accuracy", "macro_f1", "loss", "val_accuracy", "val_loss", "best_epoch"):
        assert a[key] == b[key], key


def test_missing_data_is_one_line(tmp_path: Path) -> None:
    proc = _crc_train("--data-root", str(tmp_path / "missing"), "--epochs", "1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: MedMNIST data not found") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists(), "a failed run must not leave a run dir"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--no-such-flag"], "no-such-flag"),
        (["--fusion", "mid"], "mid"),
        (["--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(args: list[str], expected: str) -> None:
    proc = _crc_train(*args)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr


def test_help_lists_the_flags() -> None:
    proc = _crc_train("train", "--help")
    assert proc.returncode == 0
    for flag in ("--data-source", "--pairing-seed", "--max-train-pairs", "--fusion", "--workers", "--quiet"):
        assert flag in proc.stdout


def test_missing_extra_message() -> None:
    code = BLOCK_TORCH + "from crc_train.cli import main\nmain(['--epochs', '1'])\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == MISSING_EXTRA + "\n"


def test_cli_module_imports_without_torch() -> None:
    code = BLOCK_TORCH + "import crc_train.cli\nassert 'torch' not in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
