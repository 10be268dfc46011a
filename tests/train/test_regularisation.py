"""AdamW parameter groups, warm-up + cosine schedule, label smoothing, EMA of the weights, legacy configs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from crc_train.config import LEGACY_TRAIN, DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.ema import ModelEma
from crc_train.losses import TrainLoss
from crc_train.optim import build_optimizer, build_scheduler, cosine_factor
from torch import nn


def test_weight_decay_only_on_kernels_and_matrices() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model.gate = nn.Parameter(torch.zeros(()))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and free["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2, 4}
    assert {id(p) for p in free["params"]} == {
        id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias), id(model.gate)
    }  # fmt: skip
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adam")), torch.optim.Adam)


def test_cosine_factor_warms_up_then_decays_to_zero() -> None:
    warm, total = 10, 110
    f = [cosine_factor(s, warm, total) for s in range(total)]
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])  # linear up to 1
    assert f[warm] == 1.0 and f[warm + 50] == pytest.approx(0.5)  # half way down the cosine
    assert all(b <= a for a, b in zip(f[warm:], f[warm + 1 :], strict=False))
    assert f[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert cosine_factor(0, 0, 5) == 1.0  # no warm-up


def test_cosine_scheduler_steps_per_optimiser_step() -> None:
    model = nn.Linear(2, 2)
    tcfg = TrainConfig(epochs=3, lr=0.1, warmup_epochs=1, accumulation_steps=2)
    opt = build_optimizer(model, tcfg)
    sched = build_scheduler(opt, tcfg, batches_per_epoch=7)  # 4 optimiser steps per epoch, 12 in all
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4:] == pytest.approx([0.1 * cosine_factor(s, 4, 12) for s in range(4, 12)])
    assert isinstance(
        build_scheduler(opt, TrainConfig(scheduler="plateau"), 7), torch.optim.lr_scheduler.ReduceLROnPlateau
    )
    assert build_scheduler(opt, TrainConfig(scheduler="none"), 7) is None


def test_label_smoothing_applies_to_the_ce_term_only() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 9), torch.randint(0, 9, (6,))
    loss = TrainLoss("ce", [10] * 9, label_smoothing=0.1)
    eps = 0.1
    target = torch.full((6, 9), eps / 9).scatter_(1, labels[:, None], 1 - eps + eps / 9)
    by_hand = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert loss(logits, None, labels) == pytest.approx(float(by_hand), rel=1e-6)
    cosine = torch.rand(6, 9)
    smoothed = TrainLoss("ce+ldam", [10] * 9, label_smoothing=0.1)(logits, cosine, labels)
    plain_ldam = TrainLoss("ldam", [10] * 9, label_smoothing=0.1)(logits, cosine, labels)
    assert smoothed == pytest.approx(float(by_hand + plain_ldam), rel=1e-6)


def test_ema_update_rule_and_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEma(model, decay=0.99)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 3))  # moves the BatchNorm running statistics and num_batches_tracked
    ema.update()  # first step: d = min(0.99, 1 / 10) = 0.1
    raw, avg = model.state_dict(), ema.module.state_dict()
    for k, v in avg.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.1 * start[k] + 0.9 * raw[k]), k
        else:
            assert torch.equal(v, raw[k]), k  # integer buffers are copied
    assert not torch.equal(avg["0.weight"], raw["0.weight"])
    assert ema.current_decay() == pytest.approx(2 / 11)
    for _ in range(2000):
        ema.update()
    assert ema.current_decay() == 0.99
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_ema_is_what_validation_and_the_checkpoint_use(synthetic_root: Path, tmp_path: Path) -> None:
    from crc_train.data import PairedDataset, load_split
    from crc_train.rundir import model_from_checkpoint
    from crc_train.training import evaluate, make_loader, train

    out = tmp_path / "run"
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion="none", image_size=28),
        data=DataConfig(source="medmnist", root=str(synthetic_root), max_train_pairs=16),
        train=TrainConfig(
            epochs=1, batch_size=4, lr=0.01, seed=2, device="cpu", progress=False, evaluate=False,
            ema_decay=0.9, out=str(out),
        ),
    )  # fmt: skip
    train(cfg)
    last = torch.load(out / "last.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    raw, avg = last["state_dict"], last["ema"]["state_dict"]
    assert last["ema"]["steps"] == 4 and last["ema"]["decay"] == 0.9
    # the averaged weights differ from the raw ones; checkpoint.pt (read by evaluate and export) holds them
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())
    assert all(torch.equal(ckpt["state_dict"][k], avg[k]) for k in avg)
    # the validation loss of the epoch is the averaged model's, not the raw model's
    loader = make_loader(PairedDataset(load_split(cfg.data, "val")), cfg.train, torch.device("cpu"))
    with open(out / "metrics.csv", newline="") as f:
        logged = float(next(csv.DictReader(f))["val_loss"])
    model = model_from_checkpoint(ckpt)
    assert evaluate(model, loader, torch.device("cpu"))["loss"] == pytest.approx(logged, abs=1e-6)
    model.load_state_dict(raw)
    assert evaluate(model, loader, torch.device("cpu"))["loss"] != pytest.approx(logged, abs=1e-6)
    # the last.pt of an averaging run without a usable average is refused in one line, before any load
    from crc_train.errors import CheckpointError
    from crc_train.rundir import check_last

    for damaged in (None, {**last["ema"], "steps": -1}, {**last["ema"], "state_dict": {}}):
        with pytest.raises(CheckpointError, match="last.pt: ema") as info:
            check_last({**last, "ema": damaged}, "last.pt")
        assert "\n" not in str(info.value)


def test_a_config_from_before_the_new_fields_keeps_its_recipe() -> None:
    saved = RunConfig().to_dict()
    for key in LEGACY_TRAIN:
        del saved["train"][key]
    old = RunConfig.from_dict(saved).train
    assert (old.augment, old.optimizer, old.label_smoothing, old.ema_decay) == ("none", "adam", 0.0, None)
    fresh = RunConfig.from_dict(RunConfig().to_dict()).train
    assert fresh == TrainConfig()  # a current config.json round-trips unchanged


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("label_smoothing", 1.0, "--label-smoothing must be in [0, 1)"),
        ("ema_decay", 1.0, "--ema-decay must be in (0, 1)"),
        ("warmup_epochs", -1.0, "--warmup-epochs must be >= 0"),
        ("augment", "heavy", "augment must be one of"),
        ("optimizer", "sgd", "optimizer must be one of"),
    ],
)
def test_bad_regularisation_settings_are_config_errors(field: str, value: object, message: str) -> None:
    from crc_train.errors import ConfigError

    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        TrainConfig(**{field: value}).validate()
