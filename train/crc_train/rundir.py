"""The run directory: every file crc-train keeps there, each written atomically (temp file + rename).

- ``config.json`` (the resolved config), ``metrics.csv`` (one row per epoch, rewritten each epoch),
  ``metrics.json``; ``atomic_path`` is what every other run-dir writer (predictions, figures, report.md)
  writes through. Files follow the umask, like any other file the user creates.
- ``checkpoint.pt``: a plain dict that alone rebuilds the model, loadable with ``weights_only=True``.
  Keys: ``format_version`` (1), ``model_config`` (dict), ``state_dict``, ``classes`` (list[str]),
  ``image_size``, ``normalization`` (dict), ``config`` (the resolved run config as a plain dict),
  ``epoch``, ``best_val_metric``, ``run_id``.
- ``last.pt``: the resume state, written after every epoch. It holds everything that the next epoch
  depends on, as tensors and plain Python values only, so it loads with ``torch.load(weights_only=True)``:
  the model (``state_dict``), optimiser, scheduler and GradScaler states, the early-stopping /
  best-checkpoint bookkeeping (``Progress``), the metrics.csv rows so far, and per rank the RNG states of
  torch (CPU and CUDA), numpy, python ``random`` and the DataLoader generator. Restoring them makes a
  resumed CPU run bit-identical to an uninterrupted one.

Both checkpoints are checked field by field against that layout when they load (``check_checkpoint``,
``check_last``, ``check_state_dict``): a file that loads but holds a wrong type, a missing tensor or a
shape of another model is one ``CheckpointError`` line naming the file and the field, never a traceback.

A new run goes into an empty (or new) folder; ``check_run_dir`` refuses a non-empty one unless it is
resumed or overwritten, and ``--overwrite`` clears only the files in ``RUN_FILES`` (``clear_run_dir``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crc_train.config import RunConfig, section_from_dict
from crc_train.errors import CheckpointError, ConfigError, UserError, first_line, shown
from crc_train.model import FusionNet, ModelConfig, build_model

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "LAST_FORMAT",
    "METRICS_CSV_FIELDS",
    "Progress",
    "RUN_FILES",
    "RunDirError",
    "atomic_path",
    "capture_rng",
    "check_checkpoint",
    "check_last",
    "check_optimizer_state",
    "check_run_dir",
    "check_state_dict",
    "clear_run_dir",
    "default_run_dir",
    "load_checkpoint",
    "load_last",
    "model_from_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "save_last",
    "write_json",
    "write_metrics_csv",
    "write_text_atomic",
]


METRICS_CSV_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file here: 0o666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` when the block succeeds, removed if not.

    The file gets the mode any new file gets (the umask applies), not mkstemp's private 0600.

    Args:
        path: The final file.
        suffix: The temporary file's suffix (writers such as ``np.savez`` or ``savefig`` go by it).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically (no newline translation)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv atomically with every epoch row so far."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def default_run_dir(cfg: RunConfig) -> Path:
    """runs/<UTC timestamp>-<backbone>-<fusion>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.model.backbone}-{cfg.model.fusion}"


# ---- the run dir as a whole: what is ours, when a new run may go into a folder

#: Every file crc-train (train and evaluate) writes into a run dir; ``--overwrite`` removes these and only
#: these. A writer of a new run-dir file adds its name here (a test fails otherwise).
RUN_FILES = (
    "config.json",
    "checkpoint.pt",
    "last.pt",
    "metrics.csv",
    "metrics.json",
    "report.md",
    "test_predictions.npz",
    "training_curves.png",
    "confusion_matrix.png",
    "roc_curves.png",
    "tsne.png",
    "gradcam.png",
)


class RunDirError(UserError):
    """A run directory that is missing, lacks the files a command needs, or may not take a new run."""


def _is_run_file(name: str) -> bool:
    """One of RUN_FILES, or the temporary file an interrupted ``atomic_path`` left beside one."""
    return name in RUN_FILES or any(name.startswith(f".{own}.") for own in RUN_FILES)


def check_run_dir(run_dir: str | Path, overwrite: bool) -> None:
    """Refuse to start a new run in ``run_dir`` unless it is new, empty, or (``overwrite``) a run dir.

    Nothing is changed here (``clear_run_dir`` does that, once the data has loaded).

    Raises:
        RunDirError: ``run_dir`` is a file, or non-empty without ``overwrite``, or holds files crc-train
            does not write (``overwrite`` never removes those).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} exists and is not a folder; choose another --out")
    if not run_dir.is_dir():
        return
    try:
        names = sorted(p.name for p in run_dir.iterdir())
    except OSError as exc:
        raise RunDirError(f"cannot read --out {run_dir}: {exc.strerror or exc}") from None
    if not names:
        return
    foreign = [n for n in names if not _is_run_file(n) or (run_dir / n).is_dir()]
    if foreign:
        names = ", ".join(map(shown, foreign[:3])) + (
            f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else ""
        )
        raise RunDirError(
            f"--out {run_dir} holds files crc-train did not write ({names}); choose another --out "
            "(--overwrite only replaces a run dir's own files)"
        )
    if not overwrite:
        raise RunDirError(
            f"--out {run_dir} already holds a run; pass --overwrite to replace it, --resume {run_dir} to "
            "continue it, or choose another --out"
        )


def clear_run_dir(run_dir: str | Path) -> list[str]:
    """Remove the run-dir files (``RUN_FILES`` and their temporary files) of ``run_dir``; returns them.

    Call ``check_run_dir`` first: it refuses a folder that holds anything else.
    """
    removed = []
    run_dir = Path(run_dir)
    for path in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if _is_run_file(path.name) and not path.is_dir():
            path.unlink()
            removed.append(path.name)
    return removed


FORMAT_VERSION = 1
REQUIRED_KEYS = (
    "format_version",
    "model_config",
    "state_dict",
    "classes",
    "image_size",
    "normalization",
    "config",
    "epoch",
    "best_val_metric",
    "run_id",
)


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Write ``ckpt`` atomically: a temp file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            torch.save(ckpt, tmp)
    except (RuntimeError, OSError) as exc:  # torch reports a full disk as "basic_ios::clear: iostream error"
        free = shutil.disk_usage(path.parent).free / 2**20
        raise CheckpointError(
            f"cannot write checkpoint {path}: {first_line(exc)} ({free:.0f} MiB free on that disk)"
        ) from exc


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` and check every field (``check_checkpoint``).

    Raises:
        CheckpointError: the file is missing, is not a readable checkpoint, or a field is missing or wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc
    check_checkpoint(ckpt, path)
    return ckpt


def _bad(where: str | Path, field: str, expected: str, value: Any) -> CheckpointError:
    text = repr(value) if not isinstance(value, torch.Tensor) else f"a tensor of shape {tuple(value.shape)}"
    text = text if len(text) <= 40 else text[:37] + "..."
    return CheckpointError(f"{where}: {field} must be {expected}, got {text}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config(value: Any, where: str) -> RunConfig:
    """The run config a checkpoint carries, typed and validated; errors are CheckpointErrors."""
    try:
        cfg = RunConfig.from_dict(value, where)
        cfg.validate()
    except ConfigError as exc:
        message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
        raise CheckpointError(message) from None
    return cfg


def _model_config(value: Any, where: str) -> ModelConfig:
    try:
        cfg = section_from_dict(ModelConfig, value, where)
        cfg.validate()
    except ConfigError as exc:
        message = str(exc) if str(exc).startswith(where) else f"{where}: {exc}"
        raise CheckpointError(message) from None
    return cfg


def _tensors(value: Any, where: str) -> dict[str, torch.Tensor]:
    """A state dict: a non-empty dict of name -> tensor."""
    if not isinstance(value, dict) or not value:
        raise _bad(where, "state_dict", "a dict of name -> tensor", value)
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise _bad(where, f"state_dict[{name!r}]", "a tensor", tensor)
    return value


def _normalization(value: Any, where: str) -> None:
    for modality, channels in (("pathology", 3), ("radiology", 1)):
        stats = value.get(modality) if isinstance(value, dict) else None
        for key in ("mean", "std"):
            numbers = stats.get(key) if isinstance(stats, dict) else None
            ok = (
                isinstance(numbers, list)
                and len(numbers) == channels
                and all(_number(v) and math.isfinite(v) for v in numbers)
                and (key == "mean" or all(v > 0 for v in numbers))
            )
            if not ok:
                expected = f"{channels} finite number(s)" + (" > 0" if key == "std" else "")
                raise _bad(where, f"normalization.{modality}.{key}", expected, numbers)


def check_checkpoint(ckpt: Any, path: str | Path) -> None:
    """Check a loaded checkpoint.pt against the layout in this module's docstring.

    Raises:
        CheckpointError: one line naming ``path`` and the first field that is missing or wrong.
    """
    where = str(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{where} is not a crc-train checkpoint (expected a dict)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{where} is not a crc-train checkpoint: missing {', '.join(missing)}")
    if not _int(ckpt["format_version"]) or ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has checkpoint format_version {ckpt['format_version']!r}; this crc-train reads "
            f"{FORMAT_VERSION}: use the crc-fusion version that wrote it"
        )
    model_cfg = _model_config(ckpt["model_config"], f"{where}: model_config")
    _tensors(ckpt["state_dict"], where)
    classes = ckpt["classes"]
    if not (isinstance(classes, list) and all(isinstance(c, str) and c for c in classes)):
        raise _bad(where, "classes", "a list of class names", classes)
    if len(classes) != model_cfg.num_classes:
        raise _bad(where, "classes", f"{model_cfg.num_classes} names (model_config.num_classes)", classes)
    if not _int(ckpt["image_size"]) or ckpt["image_size"] != model_cfg.image_size:
        raise _bad(
            where, "image_size", f"{model_cfg.image_size} (model_config.image_size)", ckpt["image_size"]
        )
    _normalization(ckpt["normalization"], where)
    _config(ckpt["config"], f"{where}: config")
    if not _int(ckpt["epoch"]) or ckpt["epoch"] < 0:
        raise _bad(where, "epoch", "an integer >= 0", ckpt["epoch"])
    if not _number(ckpt["best_val_metric"]):
        raise _bad(where, "best_val_metric", "a number", ckpt["best_val_metric"])
    if not isinstance(ckpt["run_id"], str):
        raise _bad(where, "run_id", "a string", ckpt["run_id"])


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], where: str | Path) -> None:
    """The state dict has exactly the model's tensors, with their shapes, and only finite values.

    ``load_state_dict`` would say the same in a multi-line RuntimeError; this says it in one line, first.

    Raises:
        CheckpointError: a missing or extra tensor, a shape of another model, NaN / inf weights.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = [
        k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    arch = (
        f"a {model.cfg.backbone} / fusion {model.cfg.fusion} model" if hasattr(model, "cfg") else "the model"
    )

    def first(names: list[str]) -> str:
        return names[0] + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")

    if missing:
        raise CheckpointError(f"{where}: state_dict lacks {first(missing)} of {arch}")
    if extra:
        raise CheckpointError(f"{where}: state_dict has {first(extra)}, which {arch} does not have")
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"{where}: state_dict[{k!r}] has shape {tuple(state_dict[k].shape)}, {arch} needs "
            f"{tuple(expected[k].shape)}" + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else "")
        )
    for k, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(
                f"{where}: state_dict[{k!r}] holds NaN or inf; the run diverged (retrain with a lower --lr)"
            )


def model_from_checkpoint(ckpt: dict[str, Any], where: str | Path = "checkpoint") -> FusionNet:
    """Rebuild the model from a checkpoint dict (``load_checkpoint``'s); returned in eval mode on the CPU.

    Raises:
        CheckpointError: the model config or the state dict does not describe a model of this crc-train.
    """
    cfg = _model_config(ckpt["model_config"], f"{where}: model_config")
    model = build_model(cfg, ckpt["normalization"])
    check_state_dict(model, ckpt["state_dict"], where)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


#: Version of the last.pt layout.
LAST_FORMAT = 1
LAST_KEYS = ("last_format", "config", "run_id", "epoch", "state_dict", "optimizer", "progress", "rows", "rng")


@dataclass
class Progress:
    """Early-stopping and best-checkpoint bookkeeping carried from epoch to epoch."""

    #: validation accuracy of the selected (best) epoch.
    best_acc: float = -1.0
    #: validation loss of the selected (best) epoch.
    best_loss: float = float("inf")
    #: the epoch checkpoint.pt holds (0 = none yet).
    best_epoch: int = 0
    #: lowest validation loss seen (early stopping watches it).
    es_best_loss: float = float("inf")
    #: epochs since es_best_loss last improved.
    bad_epochs: int = 0
    #: True once early stopping ended the run.
    stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the checkpoint."""
        return asdict(self)


def capture_rng(loader_generator: torch.Generator | None) -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def restore_rng(state: dict[str, Any], loader_generator: torch.Generator | None) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if loader_generator is not None and state["loader"] is not None:
        loader_generator.set_state(state["loader"])


def save_last(path: Path, state: dict[str, Any]) -> None:
    """Write last.pt atomically (temp file + rename)."""
    save_checkpoint(path, {"last_format": LAST_FORMAT, **state})


def load_last(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/last.pt`` with ``weights_only=True`` and check every field (``check_last``).

    Raises:
        CheckpointError: no last.pt, unreadable, or not a consistent crc-train resume checkpoint.
    """
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (is {run_dir} a crc-train run dir?)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from exc
    check_last(state, path)
    return state


def check_last(state: dict[str, Any], path: str | Path) -> None:
    """Check a loaded last.pt against the layout in this module's docstring (types, counts, agreement).

    What only the rebuilt model and optimiser can tell (tensor names and shapes) is checked when they
    load it (``check_state_dict``, ``check_optimizer_state``).

    Raises:
        CheckpointError: one line naming ``path`` and the first field that is wrong.
    """
    where = str(path)
    if not isinstance(state, dict) or any(k not in state for k in LAST_KEYS):
        missing = [k for k in LAST_KEYS if k not in state] if isinstance(state, dict) else []
        detail = f": missing {', '.join(missing)}" if missing else ""
        raise CheckpointError(f"{where} is not a crc-train resume checkpoint{detail}")
    if not _int(state["last_format"]) or state["last_format"] != LAST_FORMAT:
        found = state["last_format"]
        raise CheckpointError(f"{where} has last_format {found!r}; this crc-train reads {LAST_FORMAT}")
    cfg = _config(state["config"], f"{where}: config")
    if not isinstance(state["run_id"], str):
        raise _bad(where, "run_id", "a string", state["run_id"])
    epoch = state["epoch"]
    if not _int(epoch) or epoch < 1:
        raise _bad(where, "epoch", "an integer >= 1", epoch)
    _tensors(state["state_dict"], where)
    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(groups, list)
        and groups
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise _bad(where, "optimizer", "an optimiser state dict (state, param_groups)", optimizer)
    for i, group in enumerate(groups):
        for key, value in group.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise _bad(where, f"optimizer.param_groups[{i}].{key}", "a finite number", value)
    for name in ("scheduler", "scaler"):
        if state.get(name) is not None and not isinstance(state[name], dict):
            raise _bad(where, name, "a state dict or None", state[name])
    if cfg.train.scheduler != "none" and not isinstance(state.get("scheduler"), dict):
        raise _bad(where, "scheduler", f"the state of the run's --scheduler {cfg.train.scheduler}", None)
    try:
        progress = section_from_dict(Progress, state["progress"], f"{where}: progress")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if not 0 <= progress.best_epoch <= epoch or progress.bad_epochs < 0:
        raise _bad(where, "progress.best_epoch", f"in 0..{epoch} (the epoch of last.pt)", progress.best_epoch)
    rows = state["rows"]
    if not isinstance(rows, list) or len(rows) != epoch:
        raise _bad(where, "rows", f"a list of {epoch} metrics.csv rows (one per epoch)", rows)
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(METRICS_CSV_FIELDS):
            raise _bad(where, f"rows[{i}]", f"a dict of {', '.join(METRICS_CSV_FIELDS)}", row)
        if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in row.values()):
            raise _bad(where, f"rows[{i}]", "text and numbers only", row)
    rng = state["rng"]
    if not isinstance(rng, list) or not rng:
        raise _bad(where, "rng", "a list of RNG states, one per process", rng)
    for i, one in enumerate(rng):
        _check_rng(one, f"rng[{i}]", where)
    if cfg.train.ema_decay is not None:
        ema = state.get("ema")
        if not (isinstance(ema, dict) and _number(ema.get("decay")) and _int(ema.get("steps"))):
            expected = "the weight average of the run's --ema-decay (decay, steps, state_dict)"
            raise _bad(where, "ema", expected, ema)
        if ema["steps"] < 0 or not 0 < ema["decay"] < 1:
            found = {k: ema[k] for k in ("decay", "steps")}
            raise _bad(where, "ema", "steps >= 0 and a decay in (0, 1)", found)
        _tensors(ema.get("state_dict"), f"{where}: ema")


def _byte_state(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def _check_rng(state: Any, field: str, where: str) -> None:
    """One process's ``capture_rng`` dict."""
    if not isinstance(state, dict):
        raise _bad(where, field, "a dict of RNG states", state)
    n_bytes = torch.get_rng_state().numel()
    for name in ("torch", "loader"):
        value = state.get(name)
        if (name == "torch" or value is not None) and not (_byte_state(value) and value.numel() == n_bytes):
            raise _bad(where, f"{field}.{name}", f"a generator state ({n_bytes} uint8 values)", value)
    cuda = state.get("cuda")
    if not isinstance(cuda, list) or not all(_byte_state(c) for c in cuda):
        raise _bad(where, f"{field}.cuda", "a list of CUDA RNG states", cuda)
    n = state.get("numpy")
    keys = n.get("keys") if isinstance(n, dict) else None
    if not (
        isinstance(keys, torch.Tensor)
        and keys.dtype == torch.int64
        and tuple(keys.shape) == (624,)
        and _int(n.get("pos"))
        and 0 <= n["pos"] <= 624
        and _int(n.get("has_gauss"))
        and _number(n.get("cached"))
    ):
        raise _bad(where, f"{field}.numpy", "numpy's MT19937 state (keys [624], pos, has_gauss, cached)", n)
    py = state.get("python")
    py_state = py.get("state") if isinstance(py, dict) else None
    if not (
        isinstance(py_state, torch.Tensor)
        and py_state.dtype == torch.int64
        and tuple(py_state.shape) == (625,)
        and bool(((py_state >= 0) & (py_state < 2**32)).all())
        and _int(py.get("version"))
        and (py.get("gauss") is None or _number(py.get("gauss")))
    ):
        raise _bad(where, f"{field}.python", "python's random state (version, state [625], gauss)", py)


def check_optimizer_state(
    optimizer_state: dict[str, Any], params: list[torch.Tensor], where: str | Path
) -> None:
    """The saved optimiser state belongs to these parameters: one index per parameter, per-parameter
    tensors (Adam's moments) of the parameter's shape. ``load_state_dict`` checks only the counts.

    Raises:
        CheckpointError: a count or shape that does not match.
    """
    indices = [i for g in optimizer_state["param_groups"] for i in g["params"]]
    if not all(_int(i) for i in indices) or sorted(indices) != list(range(len(params))):
        raise CheckpointError(
            f"{where}: optimizer state is for {len(indices)} parameters, the model has {len(params)}"
        )
    for index, entry in optimizer_state["state"].items():
        if not _int(index) or not 0 <= index < len(params) or not isinstance(entry, dict):
            raise _bad(where, f"optimizer.state[{index!r}]", "a parameter's state", entry)
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise CheckpointError(
                    f"{where}: optimizer.state[{index}][{key!r}] has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}"
                )
