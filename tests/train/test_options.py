"""Numeric options are checked before anything is written, and a diverging run stops with one line.

Issue 12, item 10: `--lr inf` passed the `lr <= 0` check and trained NaN; `--lr nan`, `--seed -1` and
`--pairing-seed -1` failed after the run dir was made.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from crc_train.cli import main
from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.errors import DivergedError
from crc_train.losses import TrainLoss
from crc_train.training import train

# (flags, the flag the one-line error must name)
BAD_FLAGS = [
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--pairing-seed", "-1"], "--pairing-seed"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--patience", "0"], "--patience"),
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--accumulation-steps", "0"], "--accumulation-steps"),
    (["--ldam-scale", "inf"], "--ldam-scale"),
    (["--ldam-weight", "inf"], "--ldam-weight"),
    (["--ldam-max-margin", "nan"], "--ldam-max-margin"),
    (["--plateau-factor", "nan"], "--plateau-factor"),
    (["--plateau-patience", "-1"], "--plateau-patience"),
    (["--freeze-epochs", "-1"], "--freeze-epochs"),
    (["--workers", "-1"], "--workers"),
    (["--log-interval", "0"], "--log-interval"),
    (["--max-train-pairs", "0"], "--max-train-pairs"),
]


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("flags", "named"), BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_numbers_fail_before_anything_is_written(
    flags: list[str], named: str, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["--data-root", str(synthetic_root), "--epochs", "1", "--out", str(out), *flags]
    code, err = _run_cli(argv, capsys)
    assert code == 1
    assert err.startswith(f"error: {named} ") and err.count("\n") == 1, err
    assert not out.exists(), "a refused run must not leave a run dir"


def test_evaluate_refuses_a_negative_ablation_seed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_cli(["evaluate", str(tmp_path), "--ablation-seed", "-1"], capsys)
    assert code == 1 and "--ablation-seed" in err and err.count("\n") == 1, err


def _cfg(root: Path, out: Path, **train_opts: object) -> RunConfig:
    return RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="none", image_size=28),
        data=DataConfig(root=str(root), max_train_pairs=8),
        train=TrainConfig(
            batch_size=4, device="cpu", seed=0, progress=False, evaluate=False, out=str(out), **train_opts
        ),
    )


def test_a_nan_loss_in_epoch_2_stops_and_keeps_epoch_1(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss turns NaN in the second epoch: one line, and the run dir holds epoch 1's files, untouched."""
    real_forward = TrainLoss.forward
    calls = {"n": 0}

    def nan_from_epoch_2(self, logits, cosine, labels):  # noqa: ANN001, ANN202
        calls["n"] += 1
        loss = real_forward(self, logits, cosine, labels)
        return loss * float("nan") if calls["n"] > 2 else loss  # 8 pairs / batch 4 = 2 steps per epoch

    monkeypatch.setattr(TrainLoss, "forward", nan_from_epoch_2)
    out = tmp_path / "run"
    with pytest.raises(DivergedError) as err:
        train(_cfg(synthetic_root, out, epochs=3))
    message = str(err.value)
    assert "\n" not in message and "loss became nan at epoch 2" in message and "--lr" in message
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with (out / "metrics.csv").open(newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]
    assert not (out / "metrics.json").exists()
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_a_huge_learning_rate_diverges_with_one_line(
    synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No monkeypatch: Adam with lr 1e30 makes the weights overflow within the first epoch."""
    out = tmp_path / "run"
    argv = [
        "--data-root", str(synthetic_root), "--backbone", "resnet18", "--fusion", "none", "--epochs", "2",
        "--batch-size", "4", "--max-train-pairs", "8", "--device", "cpu", "--lr", "1e30", "--quiet",
        "--no-evaluate", "--out", str(out),
    ]  # fmt: skip
    code, err = _run_cli(argv, capsys)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: the training loss became ") and "at epoch 1" in err  # nan or inf
    assert "Traceback" not in err
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e30
    assert not (out / "checkpoint.pt").exists() and not (out / "last.pt").exists()
