"""Resume: a run killed with SIGKILL and continued with --resume ends exactly like an uninterrupted one.

Real subprocesses (`crc-train`), CPU, fixed seed, with the stateful parts of the default recipe on
(augmentation draws, the per-step cosine schedule, the EMA of the weights): metrics.json (test and
validation numbers), the test predictions, metrics.csv and the checkpoint / last.pt weights, raw and
averaged (bit for bit) must all be equal.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from crc_train.errors import CheckpointError
from crc_train.rundir import capture_rng, load_last, restore_rng


def _cmd(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "crc-train"
    launcher = [str(script)] if script.is_file() else [sys.executable, "-m", "crc_train.cli"]
    return [*launcher, *args]


def _args(data: Path, out: Path) -> list[str]:
    return [
        "--data-root", str(data), "--max-train-pairs", "12", "--backbone", "resnet18", "--fusion", "none",
        "--size", "28", "--epochs", "3", "--batch-size", "4", "--accumulation-steps", "2",
        "--loss", "ce+ldam", "--scheduler", "cosine", "--ema-decay", "0.9", "--augment", "full",
        "--seed", "5", "--device", "cpu", "--quiet", "--out", str(out),
    ]  # fmt: skip


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_then_resume_equals_uninterrupted(synthetic_root: Path, tmp_path: Path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = subprocess.run(_cmd(*_args(synthetic_root, ref)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr

    victim = subprocess.Popen(
        _cmd(*_args(synthetic_root, killed)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 600
    while not (killed / "last.pt").exists():  # last.pt appears (atomically) at the end of epoch 1
        assert victim.poll() is None, victim.stderr.read()
        assert time.monotonic() < deadline, "no last.pt after 600 s"
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    interrupted_at = load_last(killed)["epoch"]
    assert interrupted_at < 3, "the run finished before the kill; nothing was resumed"
    assert not (killed / "metrics.json").exists()

    proc = subprocess.run(
        _cmd("--resume", str(killed), "--quiet"), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr

    a, b = (json.loads((run / "metrics.json").read_text()) for run in (ref, killed))
    assert a.pop("run_id") != b.pop("run_id")
    assert {"accuracy", "macro_f1", "loss", "val_loss", "best_epoch", "ablation_accuracy"} <= set(a)
    assert a == b  # every number, exactly
    pa, pb = (np.load(run / "test_predictions.npz") for run in (ref, killed))
    np.testing.assert_array_equal(pa["probs"], pb["probs"])
    assert _rows(ref) == _rows(killed)
    for name in ("checkpoint.pt", "last.pt"):
        wa, wb = _weights(ref / name), _weights(killed / name)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    ea, eb = (torch.load(run / "last.pt", weights_only=True)["ema"] for run in (ref, killed))
    assert ea["steps"] == eb["steps"] == 6  # 3 epochs x 2 steps (3 batches of 4, accumulation 2)
    assert all(torch.equal(ea["state_dict"][k], eb["state_dict"][k]) for k in ea["state_dict"])
    oa, ob = (torch.load(run / "last.pt", weights_only=True)["optimizer"] for run in (ref, killed))
    assert oa["param_groups"] == ob["param_groups"]
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    assert not [p.name for p in killed.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_rng_states_round_trip_through_weights_only(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng(gen)
    torch.save({"rng": state}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3), torch.rand(3, generator=gen))

    random.seed(9), np.random.seed(9), torch.manual_seed(9), gen.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"], gen)
    got = (random.random(), np.random.standard_normal(3), torch.rand(3), torch.rand(3, generator=gen))
    assert got[0] == expected[0]
    np.testing.assert_array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2]) and torch.equal(got[3], expected[3])


def test_resume_refuses_a_dir_without_last_pt(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="last.pt not found"):
        load_last(tmp_path)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_last(tmp_path)
