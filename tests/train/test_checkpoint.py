"""Checkpoint round trip through torch.load(weights_only=True)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from crc_train.model import ModelConfig, build_model
from crc_train.rundir import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint

NORM = {
    "pathology": {"mean": [0.7, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
    "radiology": {"mean": [0.3], "std": [0.2]},
}


def _ckpt(model, cfg: ModelConfig) -> dict:
    return {
        "format_version": 1,
        "model_config": asdict(cfg),
        "state_dict": model.state_dict(),
        "classes": [f"c{i}" for i in range(9)],
        "image_size": cfg.image_size,
        "normalization": NORM,
        "config": {"model": asdict(cfg), "data": {}, "train": {"seed": 0}, "run_id": "x"},
        "epoch": 3,
        "best_val_metric": 0.5,
        "run_id": "x",
    }


def test_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="resnet18", fusion="attention", image_size=28, attention_dim=32)
    model = build_model(cfg, NORM).eval()
    with torch.no_grad():  # non-zero gates and a moved BN so the test sees every kind of state
        model.fusion3.pathology_gate.fill_(0.3)
        model.fusion4.radiology_gate.fill_(-0.2)
        model.pathology.bn1.running_mean.add_(0.1)
    path = tmp_path / "sub" / "checkpoint.pt"
    save_checkpoint(path, _ckpt(model, cfg))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["classes"][0] == "c0" and raw["normalization"] == NORM
    rebuilt = model_from_checkpoint(load_checkpoint(path))
    assert not rebuilt.training
    p = torch.randint(0, 256, (2, 28, 28, 3), dtype=torch.uint8)
    r = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model(p, r), rebuilt(p, r))


def test_missing_and_corrupt_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read") as err:
        load_checkpoint(bad)
    assert "\n" not in str(err.value)
    partial = tmp_path / "partial.pt"
    torch.save({"format_version": 1}, partial)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(partial)


_WRITE_UNDER_A_SIZE_LIMIT = """
import resource, sys, torch
from crc_train.rundir import CheckpointError, save_checkpoint
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    save_checkpoint(sys.argv[1], {"state_dict": {"w": torch.zeros(1 << 20)}})
except CheckpointError as exc:
    print(exc)
    sys.exit(3)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX only")
def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    # A real failed write: a 64 KiB file size limit (RLIMIT_FSIZE) makes the 4 MiB write fail inside torch's
    # C++ writer, as a full disk does ("basic_ios::clear: iostream error", before this error existed).
    path = tmp_path / "run" / "last.pt"
    proc = subprocess.run(
        [sys.executable, "-c", _WRITE_UNDER_A_SIZE_LIMIT, str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message
    assert message.startswith(f"cannot write checkpoint {path}: ") and "MiB free on that disk" in message
    assert list(path.parent.iterdir()) == []  # neither last.pt nor its temp file


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_run_dir_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Run-dir files get the mode of any new file (0o666 minus the umask), not mkstemp's private 0600."""
    from crc_train.rundir import write_json, write_text_atomic

    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.md", "# report\n")
        write_json(tmp_path / "config.json", {"a": 1})
        save_checkpoint(tmp_path / "checkpoint.pt", {"x": torch.zeros(1)})
    finally:
        os.umask(old)
    for name in ("report.md", "config.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
