"""config.json, checkpoint.pt and last.pt that load but are wrong: one line naming the file and field.

Issue 12, "Tracebacks": a non-UTF-8 or wrong-shaped config.json, a checkpoint whose fields have wrong types
or a missing tensor, and a `--resume` of a last.pt that loads but is inconsistent (wrong types, missing
optimiser state, rows not a list, RNG states for another number of processes) gave tracebacks or went on
silently. Each case here is a real run's file with one field damaged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from crc_train.config import load_run_config
from crc_train.errors import CheckpointError, ConfigError, UserError
from crc_train.rundir import load_checkpoint, model_from_checkpoint
from crc_train.training import resume


def _set(path: str, value: Any) -> Callable[[dict], None]:
    """A damage: set the (dot-separated) field ``path`` to ``value``; ``DROP`` removes it."""

    def damage(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        if value is DROP:
            del d[last]
        elif isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value

    return damage


DROP = object()


def _first_tensor(name_part: str, fn: Callable[[torch.Tensor], Any]) -> Callable[[dict], None]:
    def damage(d: dict) -> None:
        key = next(k for k in d["state_dict"] if name_part in k)
        value = fn(d["state_dict"][key])
        if value is DROP:
            del d["state_dict"][key]
        else:
            d["state_dict"][key] = value

    return damage


def _extra_tensor(d: dict) -> None:
    d["state_dict"]["pathology.extra.weight"] = torch.zeros(3)


# ---------------------------------------------------------------- checkpoint.pt

CHECKPOINT_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "classes is a string": (_set("classes", "ADI,BACK"), "classes"),
    "classes of another count": (lambda d: d.__setitem__("classes", d["classes"][:5]), "classes"),
    "image_size as text": (_set("image_size", "28"), "image_size"),
    "image_size of another model": (_set("image_size", 64), "image_size"),
    "normalization without radiology": (_set("normalization.radiology", DROP), "normalization.radiology"),
    "std of zero": (_set("normalization.pathology.std", [0.0, 0.0, 0.0]), "normalization.pathology.std"),
    "mean as text": (_set("normalization.pathology.mean", "0.5"), "normalization.pathology.mean"),
    "model_config unknown field": (_set("model_config.depth", 3), "unknown fields: depth"),
    "model_config backbone a number": (_set("model_config.backbone", 18), "model_config.backbone"),
    "model_config not a dict": (_set("model_config", ["resnet18"]), "model_config"),
    "model_config impossible heads": (_set("model_config.attention_heads", 5), "attention_heads"),
    "state_dict without a tensor": (_first_tensor("head.1.weight", lambda t: DROP), "lacks head.1.weight"),
    "state_dict with an extra tensor": (_extra_tensor, "pathology.extra.weight"),
    "state_dict tensor of another shape": (
        _first_tensor("head.1.weight", lambda t: torch.zeros(3, 3)),
        "shape",
    ),
    "state_dict value not a tensor": (_first_tensor("head.1.bias", lambda t: t.tolist()), "head.1.bias"),
    "state_dict NaN weights": (_first_tensor("head.1.weight", lambda t: t * float("nan")), "NaN"),
    "state_dict a list": (_set("state_dict", []), "state_dict"),
    "epoch negative": (_set("epoch", -1), "epoch"),
    "epoch as text": (_set("epoch", "1"), "epoch"),
    "run_id missing value": (_set("run_id", None), "run_id"),
    "best_val_metric as text": (_set("best_val_metric", "0.9"), "best_val_metric"),
    "format_version true": (_set("format_version", True), "format_version"),
    "format_version a tensor": (_set("format_version", torch.ones(2)), "format_version"),
    "config lr as text": (_set("config.train.lr", "fast"), "config: train.lr"),
    "config seed out of range": (_set("config.train.seed", -5), "--seed"),
    "config not a dict": (_set("config", "none"), "config"),
    "classes missing": (_set("classes", DROP), "missing classes"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_damaged_checkpoint_is_one_line(case: str, small_run: Path, clone_run) -> None:
    damage, words = CHECKPOINT_CASES[case]
    run = clone_run(small_run)
    path = run / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    damage(ckpt)
    path.unlink()  # a new file: the clone's original is a hard link to the session's run
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        model_from_checkpoint(load_checkpoint(path), path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    assert words in message, message


def test_the_real_checkpoint_passes(small_run: Path) -> None:
    path = small_run / "checkpoint.pt"
    model_from_checkpoint(load_checkpoint(path), path)


# ---------------------------------------------------------------- config.json

CONFIG_CASES: dict[str, tuple[bytes, str]] = {
    "not UTF-8": ('{"model": {"backbone": "r\xe9snet"}}'.encode("latin-1"), "not UTF-8"),
    "a list": (b"[1, 2, 3]", "must be an object"),
    "a section that is a string": (b'{"train": "fast"}', "train must be an object"),
    "lr as text": (b'{"train": {"lr": "0.1"}}', "train.lr must be a number"),
    "epochs a float": (b'{"train": {"epochs": 2.5}}', "train.epochs must be an integer"),
    "mmap as text": (b'{"data": {"mmap": "yes"}}', "data.mmap must be true or false"),
    "an unknown field": (b'{"model": {"depth": 50}}', "unknown fields: depth"),
    "lr out of range": (b'{"train": {"lr": -1}}', "--lr"),
    "size not a MedMNIST size": (b'{"model": {"image_size": 30}, "data": {"size": 30}}', "image size"),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, "config.json"),
    "not JSON": (b"{model: resnet}", "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_damaged_config_json_is_one_line(case: str, tmp_path: Path) -> None:
    content, words = CONFIG_CASES[case]
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)) and words in message, message


def test_a_real_config_json_loads(small_run: Path) -> None:
    cfg, raw = load_run_config(small_run / "config.json")
    assert cfg.model.backbone == "resnet18" and raw["run_id"] and cfg.train.out == str(small_run)


# ---------------------------------------------------------------- last.pt (--resume)


def _optimizer_shape(d: dict) -> None:
    state = d["optimizer"]["state"]
    first = next(iter(state))
    state[first]["exp_avg"] = torch.zeros(2, 2)


def _optimizer_groups(d: dict) -> None:
    d["optimizer"]["param_groups"][0]["params"] = d["optimizer"]["param_groups"][0]["params"][:-3]


LAST_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "rows not a list": (_set("rows", "epoch,train_loss"), "rows"),
    "rows of another count": (lambda d: d["rows"].append(dict(d["rows"][0])), "rows"),
    "a row without val_loss": (_set("rows.0.val_loss", DROP), "rows[0]"),
    "optimizer without state": (_set("optimizer.state", DROP), "optimizer"),
    "optimizer a list": (_set("optimizer", []), "optimizer"),
    "optimizer for fewer parameters": (_optimizer_groups, "optimizer state is for"),
    "optimizer moment of another shape": (_optimizer_shape, "optimizer.state["),
    "optimizer lr nan": (_set("optimizer.param_groups.0.lr", float("nan")), "param_groups[0].lr"),
    "state_dict without a tensor": (_first_tensor("head.1.weight", lambda t: DROP), "lacks head.1.weight"),
    "state_dict tensor of another shape": (_first_tensor("fusion3", lambda t: torch.zeros(1)), "shape"),
    "rng for two processes": (lambda d: d["rng"].append(d["rng"][0]), "2 process(es)"),
    "rng torch state as floats": (
        lambda d: d["rng"][0].__setitem__("torch", torch.zeros(5056)),
        "rng[0].torch",
    ),
    "rng numpy keys cut": (_set("rng.0.numpy.keys", torch.zeros(10, dtype=torch.int64)), "rng[0].numpy"),
    "rng python state a list": (_set("rng.0.python.state", [1, 2, 3]), "rng[0].python"),
    "rng empty": (_set("rng", []), "rng"),
    "progress best_epoch as text": (_set("progress.best_epoch", "1"), "progress.best_epoch"),
    "progress unknown field": (_set("progress.patience_left", 3), "unknown fields"),
    "progress best_epoch after epoch": (_set("progress.best_epoch", 7), "progress.best_epoch"),
    "config lr as text": (_set("config.train.lr", "x"), "config: train.lr"),
    "config a list": (_set("config", []), "config"),
    "epoch as text": (_set("epoch", "1"), "epoch"),
    "epoch zero": (_set("epoch", 0), "epoch"),
    "run_id a number": (_set("run_id", 7), "run_id"),
    "scheduler a list": (_set("scheduler", [1]), "scheduler"),
    "last_format true": (_set("last_format", True), "last_format"),
}


@pytest.mark.parametrize("case", sorted(LAST_CASES))
def test_inconsistent_last_pt_is_refused_before_anything_is_written(
    case: str, small_run: Path, clone_run
) -> None:
    damage, words = LAST_CASES[case]
    run = clone_run(small_run)
    path = run / "last.pt"
    state = torch.load(path, weights_only=True)
    damage(state)
    path.unlink()
    torch.save(state, path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(UserError) as err:
        resume(run, progress=False)
    message = str(err.value)
    assert "\n" not in message and words in message, message
    assert str(path) in message or "process(es)" in message, message
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before, "a refused resume changed the run dir"


def test_cli_resume_of_an_inconsistent_last_pt(small_run: Path, clone_run, capsys) -> None:
    from crc_train.cli import main

    run = clone_run(small_run)
    state = torch.load(run / "last.pt", weights_only=True)
    state["rows"] = {"epoch": 1}
    (run / "last.pt").unlink()
    torch.save(state, run / "last.pt")
    with pytest.raises(SystemExit) as exc:
        main(["--resume", str(run), "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.count("\n") == 1 and err.startswith(f"error: {run / 'last.pt'}: rows")
    assert "Traceback" not in err
    assert json.loads((run / "config.json").read_text()) == json.loads(
        (small_run / "config.json").read_text()
    )
