"""training_curves.png: loss and accuracy per epoch, train vs validation, from the metrics.csv rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crc_train.rundir import atomic_path

__all__ = ["CURVES_PNG", "plot_training_curves"]

#: File name of the curves in the run dir.
CURVES_PNG = "training_curves.png"


def plot_training_curves(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Two panels (loss, accuracy), train and validation per epoch; written atomically.

    Args:
        rows: metrics.csv rows (epoch, train_loss, train_acc, val_loss, val_acc, lr as strings or numbers).
        path: the PNG to write.
        title: figure title (e.g. backbone / fusion / loss).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    col = {k: [float(r[k]) for r in rows] for k in ("train_loss", "val_loss", "train_acc", "val_acc", "lr")}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    marker = "o" if len(epochs) <= 30 else None
    ax_loss.plot(epochs, col["train_loss"], marker=marker, label="train (training objective)")
    ax_loss.plot(epochs, col["val_loss"], marker=marker, label="validation (cross-entropy)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, col["train_acc"], marker=marker, label="train")
    ax_acc.plot(epochs, col["val_acc"], marker=marker, label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    # mark learning-rate drops (ReduceLROnPlateau) on both panels
    for prev, cur, e in zip(col["lr"][:-1], col["lr"][1:], epochs[1:], strict=True):
        if cur < prev:
            for ax in (ax_loss, ax_acc):
                ax.axvline(e, color="grey", linestyle=":", linewidth=1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 15 else ax.get_xticks())
    if title:
        fig.suptitle(title + ("   (dotted: learning-rate drop)" if len(set(col["lr"])) > 1 else ""))
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
