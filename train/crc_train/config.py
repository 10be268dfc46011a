"""Configuration dataclasses for data, model and training: every default lives here.

This module imports neither torch nor medmnist, so the CLI can build and validate a config without the
training extra. `data.py` and `model.py` re-export `DataConfig` and `ModelConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from crc_train.errors import ConfigError

BACKBONES = ("resnet18", "resnet34", "resnet50")
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
        if self.max_train_pairs is not None and self.max_train_pairs < 1:
            raise ConfigError(f"max_train_pairs must be >= 1, got {self.max_train_pairs}")
        for name in ("synthetic_train", "synthetic_val", "synthetic_test"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


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
    #: pretrained weights for the branches (hook for ImageNet loading; None = random init).
    pretrained: str | None = None

    def validate(self) -> None:
        """Raise ConfigError with a user-facing message for an impossible setting."""
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.attention_heads < 1 or self.attention_dim % self.attention_heads:
            raise ConfigError(
                f"attention_dim ({self.attention_dim}) must be divisible by attention_heads "
                f"({self.attention_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pretrained is not None:
            raise ConfigError("pretrained weights are not supported yet; leave pretrained unset")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of one training run."""

    #: passes over the training pairs.
    epochs: int = 10
    #: pairs per optimiser step.
    batch_size: int = 64
    #: Adam learning rate.
    lr: float = 1e-3
    #: Adam weight decay (L2).
    weight_decay: float = 0.0
    #: seed for torch, numpy, python random and the DataLoader shuffling.
    seed: int = 0
    #: DataLoader worker processes (0 = load in the main process).
    workers: int = 0
    #: "auto" (cuda if available), "cpu" or "cuda".
    device: str = "auto"
    #: run directory; None = runs/<timestamp>-<backbone>-<fusion>.
    out: str | None = None
    #: log a progress line every this many optimiser steps (and at the end of each epoch).
    log_interval: int = 50

    def validate(self) -> None:
        """Raise ConfigError with a user-facing message for an impossible setting."""
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.log_interval < 1:
            raise ConfigError(f"log_interval must be >= 1, got {self.log_interval}")


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
