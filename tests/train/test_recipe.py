"""The training recipe end to end on tiny synthetic data (resnet18, 28 px, CPU).

`--preset paper` through the CLI (with explicit flags overriding it), every fusion strategy through the
recipe (CE+LDAM, gradient accumulation, plateau schedule, early stopping), the files of the run dir, and
`crc-train compare` of the preset run against the pathology-only run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from crc_train.cli import cli
from crc_train.config import PRESETS, DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.rundir import RUN_FILES
from crc_train.training import train


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _cfg(root: Path, out: Path, fusion: str, **train: object) -> RunConfig:
    return RunConfig(
        model=ModelConfig(backbone="resnet18", fusion=fusion, image_size=28, attention_dim=32),
        data=DataConfig(source="medmnist", root=str(root), max_train_pairs=8),
        train=TrainConfig(
            batch_size=4, accumulation_steps=2, loss="ce+ldam", device="cpu", seed=1, progress=False,
            out=str(out), **train,
        ),
    )  # fmt: skip


@pytest.fixture(scope="module")
def none_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pathology-only baseline through the whole recipe: 3 epochs, patience 1, plateau x0.5 after 0."""
    out = tmp_path_factory.mktemp("recipe") / "none"
    train(
        _cfg(synthetic_root, out, "none", epochs=3, lr=0.05, patience=1, scheduler="plateau",
             plateau_patience=0, plateau_factor=0.5, select_on="val_loss")
    )  # fmt: skip
    return out


def test_recipe_early_stopping_plateau_and_best_checkpoint(none_run: Path) -> None:
    run = none_run
    # Every file a finished run holds is one crc-train knows as its own (--overwrite removes exactly these).
    assert sorted(p.name for p in run.iterdir()) == sorted(RUN_FILES)
    metrics = json.loads((run / "metrics.json").read_text())
    rows = _rows(run)
    assert metrics["epochs_run"] == len(rows) and metrics["fusion"] == "none"
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["n_test"] == 30
    val = [float(r["val_loss"]) for r in rows]
    lrs = [float(r["lr"]) for r in rows]
    # best checkpoint on validation loss
    assert metrics["best_epoch"] == 1 + val.index(min(val))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == metrics["best_epoch"]
    # early stopping, patience 1: the run stops right after the first epoch without a lower val loss
    worse = [i for i in range(1, len(val)) if val[i] >= min(val[:i])]
    assert metrics["early_stopped"] == bool(worse)
    assert len(rows) == (worse[0] + 1 if worse else 3)
    # ReduceLROnPlateau (patience 0, x0.5): the rate only falls, and halves after a non-improving epoch
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))
    for i in range(1, len(val) - 1):
        if val[i] >= min(val[:i]):
            assert lrs[i + 1] == pytest.approx(lrs[i] * 0.5)


@pytest.mark.parametrize("fusion", ["early", "late"])
def test_other_fusions_train_through_the_recipe(synthetic_root: Path, tmp_path: Path, fusion: str) -> None:
    result = train(_cfg(synthetic_root, tmp_path / fusion, fusion, epochs=1, evaluate=False))
    metrics = json.loads((tmp_path / fusion / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and "accuracy" not in metrics  # no test evaluation asked for
    assert result.model.fusion == fusion
    ckpt = torch.load(tmp_path / fusion / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["train"]["loss"] == "ce+ldam"
    # the step changed every parameter that gets a gradient (the gates of attention start at 0 and move)
    from crc_train.model import build_model

    torch.manual_seed(1)  # the loop seeds with TrainConfig.seed right before building the model
    fresh = build_model(result.model.cfg).state_dict()
    moved = [
        k for k, v in ckpt["state_dict"].items() if k.endswith("weight") and not torch.equal(v, fresh[k])
    ]
    assert "head.1.weight" in moved and any(k.startswith("pathology.") for k in moved)


def test_preset_paper_with_overrides_then_compare(
    synthetic_root: Path, none_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "paper"
    args = [
        "train", "--preset", "paper", "--data-root", str(synthetic_root), "--max-train-pairs", "8",
        "--backbone", "resnet18", "--size", "28", "--epochs", "2", "--batch-size", "4", "--device", "cpu",
        "--seed", "1", "--quiet", "--out", str(run),
    ]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    t = json.loads((run / "config.json").read_text())
    # explicit flags win ...
    assert t["model"]["backbone"] == "resnet18" and t["data"]["size"] == t["model"]["image_size"] == 28
    assert t["train"]["epochs"] == 2 and t["train"]["batch_size"] == 4
    # ... the preset sets everything else
    preset = PRESETS["paper"]
    for key in ("accumulation_steps", "patience", "scheduler", "plateau_factor", "loss", "select_on",
                "optimizer", "weight_decay", "label_smoothing", "ema_decay", "augment",
                "shuffle_pairs"):  # fmt: skip
        assert t["train"][key] == preset[("train", key)], key
    assert (t["train"]["optimizer"], t["train"]["ema_decay"], t["train"]["augment"]) == ("adam", None, "full")
    assert t["model"]["fusion"] == "attention" and t["train"]["accumulation_steps"] == 4
    assert [r["epoch"] for r in _rows(run)] == ["1", "2"]

    compare = CliRunner().invoke(cli, ["compare", str(run), str(none_run)])
    assert compare.exit_code == 0, compare.output
    assert "McNemar" in compare.output


def test_help_says_flags_override_the_preset() -> None:
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "explicitly override the preset" in text
    for flag in ("--accumulation-steps", "--patience", "--plateau-factor", "--plateau-patience", "--loss",
                 "--ldam-max-margin", "--ldam-scale", "--amp", "--channels-last", "--compile", "--resume",
                 "--pretrained", "--freeze-epochs", "--seed"):  # fmt: skip
        assert flag in text, flag


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--loss", "focal"], "focal"),
        (["--accumulation-steps", "0"], "--accumulation-steps must be >= 1"),
        (["--amp", "fp16", "--device", "cpu"], "--amp fp16 needs a CUDA device"),
        (["--patience", "0"], "patience must be >= 1"),
        (["--resume", "/nonexistent/run", "--lr", "0.1"], "drop --lr"),
        (["--resume", "/nonexistent/run"], "last.pt not found"),
    ],
)
def test_bad_recipe_flags_are_one_line_errors(args: list[str], expected: str, capfd) -> None:  # noqa: ANN001
    from crc_train.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["train", *args])
    assert exc.value.code == 1
    err = capfd.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


def test_bf16_autocast_on_cpu(synthetic_root: Path, tmp_path: Path) -> None:
    result = train(_cfg(synthetic_root, tmp_path / "bf16", "late", epochs=1, amp="bf16", evaluate=False))
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and torch.isfinite(torch.tensor(metrics["val_loss"]))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not a cast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["fp16", "bf16", "off"])
def test_cuda_amp_channels_last_compile(synthetic_root: Path, tmp_path: Path, amp: str) -> None:
    out = tmp_path / amp
    cfg = _cfg(synthetic_root, out, "attention", epochs=2, amp=amp, evaluate=False)
    cfg.train.device, cfg.train.channels_last, cfg.train.compile = "cuda", True, amp == "bf16"
    train(cfg)
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    # resuming restores the GradScaler too and finishes the run
    from crc_train.training import resume

    resume(out, epochs=3)
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 3
