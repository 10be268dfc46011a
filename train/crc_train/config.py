"""Configuration dataclasses for data, model and training: every default lives here.

This module imports neither torch nor medmnist, so the CLI can build and validate a config without the
training extra. `data.py` and `model.py` re-export `DataConfig` and `ModelConfig`.
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from crc_train.errors import ConfigError, shown

BACKBONES = ("resnet18", "resnet34", "resnet50")
LOSSES = ("ce", "ldam", "ce+ldam")
AMP_MODES = ("off", "bf16", "fp16")
SCHEDULERS = ("none", "plateau", "cosine")
OPTIMIZERS = ("adam", "adamw")
AUGMENTS = ("none", "d4", "full")
SELECT_ON = ("val_acc", "val_loss")
FUSIONS = ("none", "early", "late", "attention")
SIZES = (28, 64, 128, 224)
DATA_SOURCES = ("medmnist", "synthetic")


@dataclass
class DataConfig:
    """Where the paired images come from and how they are paired."""

    #: "medmnist" reads the npz files through the medmnist package; "synthetic" writes fake ones first.
    source: str = "medmnist"
    #: folder with the npz files (default ~/.medmnist); for "synthetic", where they are written.
    root: str | None = None
    #: image side in pixels: 28, 64, 128 or 224 (MedMNIST+ sizes).
    size: int = 28
    #: let medmnist download missing npz files (needs internet).
    download: bool = False
    #: one seed from which every split's pathology -> radiology pairing permutation is derived.
    pairing_seed: int = 0
    #: open the npz with mmap_mode="r" (worth it for the 128/224 px files).
    mmap: bool = False
    #: training samples per modality written by the synthetic source.
    synthetic_train: int = 600
    #: validation samples per modality written by the synthetic source.
    synthetic_val: int = 150
    #: test samples per modality written by the synthetic source.
    synthetic_test: int = 150
    #: keep only the first N training pairs (quick runs); None keeps all.
    max_train_pairs: int | None = None

    def validate(self) -> None:
        """Raise ConfigError with a user-facing message for an impossible setting."""
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        if self.size not in SIZES:
            raise ConfigError(f"image size must be one of {', '.join(map(str, SIZES))}, got {self.size}")
        _in_range("--pairing-seed", self.pairing_seed, 0, None)
        if self.max_train_pairs is not None:
            _in_range("--max-train-pairs", self.max_train_pairs, 1, None)
        for name in ("synthetic_train", "synthetic_val", "synthetic_test"):
            _in_range(f"data.{name}", getattr(self, name), 1, None)


@dataclass
class ModelConfig:
    """Architecture of the dual-branch fusion network."""

    #: torchvision ResNet used for each branch: resnet18, resnet34 or resnet50.
    backbone: str = "resnet50"
    #: none (pathology only), early (4-channel input), late (pooled concat), attention (mid + late).
    fusion: str = "attention"
    #: number of output classes (PathMNIST has 9).
    num_classes: int = 9
    #: input side in pixels; below 128 the stem is a 3x3 stride-1 conv without max-pool.
    image_size: int = 28
    #: channel width of the cross-modal attention tokens.
    attention_dim: int = 256
    #: attention heads; attention_dim must be divisible by it.
    attention_heads: int = 4
    #: dropout before the linear head.
    dropout: float = 0.3
    #: branch weights at the start of training: None (random), "imagenet" (torchvision) or a state-dict path.
    pretrained: str | None = None

    def validate(self) -> None:
        """Raise ConfigError with a user-facing message for an impossible setting."""
        _require_finite(self, "model.")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.image_size not in SIZES:
            raise ConfigError(
                f"image size must be one of {', '.join(map(str, SIZES))}, got {self.image_size}"
            )
        _in_range("model.num_classes", self.num_classes, 2, None)
        _in_range("model.attention_dim", self.attention_dim, 1, None)
        if self.attention_heads < 1 or self.attention_dim % self.attention_heads:
            raise ConfigError(
                f"attention_dim ({self.attention_dim}) must be divisible by attention_heads "
                f"({self.attention_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pretrained is not None and not str(self.pretrained).strip():
            raise ConfigError("pretrained must be 'imagenet' or the path of a saved torchvision state dict")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    #: passes over the training pairs.
    epochs: int = 10
    #: pairs per micro-batch and process (one optimiser step sees batch x accumulation_steps x processes).
    batch_size: int = 64
    #: peak learning rate (after the warm-up of the cosine schedule).
    lr: float = 1e-3
    #: weight decay: decoupled for AdamW, L2 added to the gradient for Adam; never on biases, norms, gates.
    weight_decay: float = 0.05
    #: seed for torch, numpy, python random and the DataLoader shuffling.
    seed: int = 0
    #: DataLoader worker processes (0 = load in the main process).
    workers: int = 0
    #: "auto" (cuda if available), "cpu" or "cuda".
    device: str = "auto"
    #: run directory; None = runs/<timestamp>-<backbone>-<fusion>.
    out: str | None = None
    #: log a progress line every this many micro-batches (and at the end of each epoch).
    log_interval: int = 50
    #: micro-batches whose gradients are summed before one optimiser step (effective batch = batch x this).
    accumulation_steps: int = 1
    #: "ce" (cross-entropy), "ldam" (LDAM on the head's cosine logits) or "ce+ldam" (their sum, losses.py).
    loss: str = "ce"
    #: LDAM's largest per-class margin (the rarest training class gets it; Cao et al. use 0.5).
    ldam_max_margin: float = 0.5
    #: LDAM's logit scale s applied to the cosine logits (Cao et al. use 30).
    ldam_scale: float = 30.0
    #: weight lambda of the LDAM term in "ce+ldam" (loss = CE + lambda * LDAM).
    ldam_weight: float = 1.0
    #: stop when the validation loss has not improved for this many epochs; None = never stop early.
    patience: int | None = None
    #: learning-rate schedule: "cosine" (linear warm-up, then cosine decay to 0, per optimiser step),
    #: "plateau" (ReduceLROnPlateau on the validation loss) or "none".
    scheduler: str = "cosine"
    #: ReduceLROnPlateau: multiply the learning rate by this factor on a plateau.
    plateau_factor: float = 0.1
    #: ReduceLROnPlateau: epochs without validation-loss improvement before the rate drops.
    plateau_patience: int = 5
    #: cosine schedule: epochs of linear warm-up from lr / steps to lr (fractions allowed).
    warmup_epochs: float = 1.0
    #: "adamw" (decoupled weight decay, Loshchilov & Hutter) or "adam" (the paper's).
    optimizer: str = "adamw"
    #: label smoothing of the cross-entropy term (0 = none; the LDAM term is never smoothed).
    label_smoothing: float = 0.1
    #: training augmentation (augment.py): "full" (pathology D4 + H&E jitter, CT intensity + affine jitter),
    #: "d4" (pathology flips / rotations only) or "none".
    augment: str = "full"
    #: re-pair the radiology images across each training batch at every step (augment.shuffle_pairs); valid
    #: only because the pairing is synthetic. Validation and test keep the seeded pairing.
    shuffle_pairs: bool = False
    #: decay of the exponential moving average of the weights (validated, checkpointed, exported); None = off.
    ema_decay: float | None = None
    #: which validation number picks checkpoint.pt: "val_acc" (ties -> lower loss) or "val_loss".
    select_on: str = "val_acc"
    #: mixed precision: "off", "bf16" (CPU or CUDA autocast) or "fp16" (CUDA autocast + GradScaler).
    amp: str = "off"
    #: train in channels_last memory format (faster convolutions on tensor-core GPUs).
    channels_last: bool = False
    #: wrap the training forward pass in torch.compile.
    compile: bool = False
    #: keep both backbones frozen for this many first epochs (then unfreeze; the rest always trains).
    freeze_epochs: int = 0
    #: show a tqdm bar per epoch (only on a TTY and on rank 0).
    progress: bool = True
    #: at the end, evaluate checkpoint.pt on the test split: report.md, figures (evaluation.evaluate_run).
    evaluate: bool = True

    def validate(self) -> None:
        """Raise ConfigError with a user-facing message for an impossible setting."""
        _require_finite(self, "--")
        _in_range("--epochs", self.epochs, 1, None)
        _in_range("--batch-size", self.batch_size, 1, None)
        if self.lr <= 0:
            raise ConfigError(f"--lr (learning rate) must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        _in_range("--seed", self.seed, 0, MAX_SEED)
        _in_range("--workers", self.workers, 0, None)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        _in_range("--log-interval", self.log_interval, 1, None)
        _in_range("--accumulation-steps", self.accumulation_steps, 1, None)
        _choice("loss", self.loss, LOSSES)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("select_on", self.select_on, SELECT_ON)
        _choice("amp", self.amp, AMP_MODES)
        if not 0 < self.ldam_max_margin < 2:
            raise ConfigError(f"--ldam-max-margin must be in (0, 2), got {self.ldam_max_margin}")
        if self.ldam_scale <= 0:
            raise ConfigError(f"--ldam-scale must be > 0, got {self.ldam_scale}")
        if self.ldam_weight < 0:
            raise ConfigError(f"--ldam-weight must be >= 0, got {self.ldam_weight}")
        if self.patience is not None:
            _in_range("--patience", self.patience, 1, None)
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"--plateau-factor must be in (0, 1), got {self.plateau_factor}")
        _in_range("--plateau-patience", self.plateau_patience, 0, None)
        _in_range("--freeze-epochs", self.freeze_epochs, 0, None)
        if self.amp == "fp16" and self.device == "cpu":
            raise ConfigError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or --amp off")
        self._validate_regularisation()

    def _validate_regularisation(self) -> None:
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("augment", self.augment, AUGMENTS)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not self.warmup_epochs >= 0:  # also refuses NaN
            raise ConfigError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--ema-decay must be in (0, 1), got {self.ema_decay}")


#: Largest --seed: numpy's legacy seeding (np.random.seed) takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _in_range(label: str, value: int, low: int, high: int | None) -> None:
    """An integer setting in [low, high] (no upper bound when ``high`` is None)."""
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise ConfigError(f"{label} must be {bound}, got {value}")


def _require_finite(section: Any, prefix: str) -> None:
    """Every float field of ``section`` must be a finite number (``--lr inf`` passes ``lr > 0``).

    Args:
        section: a config dataclass.
        prefix: how its fields are named to the user: ``"--"`` (a flag of the same name) or ``"model."``.
    """
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            label = f"--{f.name.replace('_', '-')}" if prefix == "--" else f"{prefix}{f.name}"
            raise ConfigError(f"{label} must be a finite number, got {value}")


# ---- the typed loader: config.json, the checkpoint's config, last.pt's config


def _expect(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against a field annotation (bool, int, float, str, X | None, list/tuple of X).

    Returns:
        The value, with an int widened to float for a float field and a JSON list turned into a tuple
        for a tuple field.

    Raises:
        ConfigError: the value has another type; the message names ``where``.
    """
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
    options = typing.get_args(hint) if union else ()
    if options:
        if value is None and type(None) in options:
            return None
        (hint,) = [o for o in options if o is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_short(value)}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        items = [_expect(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise TypeError(f"config field {where}: the loader does not know the annotation {hint!r}")
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        raise ConfigError(f"{where} must be {kind}, got {_short(value)}")
    return float(value) if hint is float else value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def section_from_dict(klass: type, data: Any, where: str) -> Any:
    """Build config dataclass ``klass`` from a plain dict, checking every field's type.

    Missing fields take their defaults (configs of older versions load); unknown fields are refused.

    Raises:
        ConfigError: not a dict, an unknown field or a value of the wrong type, named by ``where``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object (a dict), got {_short(data)}")
    hints = typing.get_type_hints(klass)
    known = {f.name for f in fields(klass)}
    unknown = sorted(shown(k) for k in set(data) - known)
    if unknown:
        raise ConfigError(f"{where} has unknown fields: {', '.join(unknown)}")
    return klass(**{name: _expect(value, hints[name], f"{where}.{name}") for name, value in data.items()})


@dataclass
class RunConfig:
    """Everything that defines a run; saved as config.json and inside the checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Validate every section and their agreement."""
        self.model.validate()
        self.data.validate()
        self.train.validate()
        if self.model.image_size != self.data.size:
            raise ConfigError(
                f"model image_size ({self.model.image_size}) differs from data size ({self.data.size})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON- and weights_only-safe)."""
        return {"model": asdict(self.model), "data": asdict(self.data), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "saved config") -> RunConfig:
        """The inverse of ``to_dict`` (extra top-level keys such as run_id are ignored), type-checked.

        Args:
            d: the plain dict (config.json, or the copy inside a checkpoint).
            where: how errors name its source, e.g. the file.

        Raises:
            ConfigError: not a dict, a section that is not one, a field this version does not know or a
                value of the wrong type. Ranges are ``validate``'s job.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be an object (a dict), got {_short(d)}")
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        saved = dict(d)
        if isinstance(saved.get("train"), dict) and saved["train"]:
            saved["train"] = {**LEGACY_TRAIN, **saved["train"]}
        built = {
            name: section_from_dict(klass, saved.get(name, {}), f"{where}: {name}")
            for name, klass in sections.items()
        }
        return cls(**built)


def load_run_config(path: str | Path) -> tuple[RunConfig, dict[str, Any]]:
    """Read a run's config.json: one typed, validated config, or one user error naming the file.

    Returns:
        (the config, the file's dict as read: it also holds ``run_id``).

    Raises:
        ConfigError: unreadable, not UTF-8, not JSON, not a config, or a value out of range.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        raw = json.loads(text)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); is it a crc-train config.json?"
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply to be a crc-train config") from None
    cfg = RunConfig.from_dict(raw, str(path))
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg, raw


#: What a saved train section that lacks a field meant when it was written: config.json files from before
#: augmentation, AdamW, label smoothing and EMA existed trained without them, so ``--resume`` of such a
#: run keeps its recipe instead of switching to today's defaults.
LEGACY_TRAIN: dict[str, Any] = {
    "augment": "none",
    "optimizer": "adam",
    "label_smoothing": 0.0,
    "warmup_epochs": 0.0,
    "ema_decay": None,
}


#: ``--preset paper``: the recipe of seed paper 000, as (section, field) -> value. The paper fixes the
#: optimiser (Adam), batch 32 x accumulation 4, at most 50 epochs, early stopping on the validation
#: loss, ReduceLROnPlateau, CE combined with LDAM (largest margin 0.5), 64 px, ResNet50 and attention
#: fusion; it gives no patience, plateau factor or LDAM scale, so those are our choices (patience 10,
#: the rate x0.1 after 5 flat epochs so it drops before early stopping can trigger, s = 30 as in Cao et
#: al.'s code). The paper says nothing about augmentation, weight decay, label smoothing or weight averaging:
#: the preset keeps augmentation on ("full", what every histopathology trainer does) and turns the other
#: three off, so the optimisation is the paper's own. Explicit flags override every entry.
PRESETS: dict[str, dict[tuple[str, str], Any]] = {
    "paper": {
        ("model", "backbone"): "resnet50",
        ("model", "fusion"): "attention",
        ("model", "image_size"): 64,
        ("data", "size"): 64,
        ("train", "batch_size"): 32,
        ("train", "accumulation_steps"): 4,
        ("train", "epochs"): 50,
        ("train", "lr"): 1e-3,
        ("train", "patience"): 10,
        ("train", "scheduler"): "plateau",
        ("train", "plateau_factor"): 0.1,
        ("train", "plateau_patience"): 5,
        ("train", "select_on"): "val_loss",
        ("train", "loss"): "ce+ldam",
        ("train", "ldam_max_margin"): 0.5,
        ("train", "ldam_scale"): 30.0,
        ("train", "ldam_weight"): 1.0,
        ("train", "optimizer"): "adam",
        ("train", "weight_decay"): 0.0,
        ("train", "label_smoothing"): 0.0,
        ("train", "ema_decay"): None,
        ("train", "augment"): "full",
        ("train", "shuffle_pairs"): False,
    }
}
