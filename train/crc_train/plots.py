"""The run's figures: training curves, confusion matrix, ROC curves, t-SNE, Grad-CAM of sample pairs.

Drawn on ``matplotlib.figure.Figure`` objects (no pyplot, no global backend state) and saved
atomically. Axes use the NCT-CRC-HE abbreviations (TUM, STR, ...) with the full names in the legend or
on the rows, so nine long class names stay legible.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from crc_train.metrics import short_name
from crc_train.rundir import atomic_path

__all__ = [
    "CURVES_PNG",
    "plot_confusion_matrix",
    "plot_gradcam_grid",
    "plot_roc_curves",
    "plot_training_curves",
    "plot_tsne",
    "tsne_embedding",
]

log = logging.getLogger(__name__)

DPI = 150

#: File name of the curves in the run dir.
CURVES_PNG = "training_curves.png"


def plot_training_curves(
    rows: list[dict[str, Any]], path: Path, title: str = "", mark_lr_drops: bool = True
) -> None:
    """Two panels (loss, accuracy), train and validation per epoch; written atomically.

    Args:
        rows: metrics.csv rows (epoch, train_loss, train_acc, val_loss, val_acc, lr as strings or numbers).
        path: the PNG to write.
        title: figure title (e.g. backbone / fusion / loss).
        mark_lr_drops: draw a dotted line where the rate fell (ReduceLROnPlateau); off for a cosine
            schedule, whose rate falls every epoch.
    """
    from matplotlib.figure import Figure

    epochs = [int(r["epoch"]) for r in rows]
    col = {k: [float(r[k]) for r in rows] for k in ("train_loss", "val_loss", "train_acc", "val_acc", "lr")}
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    marker = "o" if len(epochs) <= 30 else None
    ax_loss.plot(epochs, col["train_loss"], marker=marker, label="train (training objective)")
    ax_loss.plot(epochs, col["val_loss"], marker=marker, label="validation (cross-entropy)")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, col["train_acc"], marker=marker, label="train")
    ax_acc.plot(epochs, col["val_acc"], marker=marker, label="validation")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    # mark learning-rate drops (ReduceLROnPlateau) on both panels
    drops = [e for prev, cur, e in zip(col["lr"][:-1], col["lr"][1:], epochs[1:], strict=True) if cur < prev]
    for e in drops if mark_lr_drops else []:
        for ax in (ax_loss, ax_acc):
            ax.axvline(e, color="grey", linestyle=":", linewidth=1)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xticks(epochs if len(epochs) <= 15 else ax.get_xticks())
    if title:
        fig.suptitle(title + ("   (dotted: learning-rate drop)" if mark_lr_drops and drops else ""))
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def _save(fig, path: Path) -> None:  # noqa: ANN001 - a matplotlib Figure
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")


def _row_label(name: str) -> str:
    short = short_name(name)
    return name if short == name else f"{short}  {name}"


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Annotated heatmap: colour = row-normalised share, text = count and row percentage."""
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    n = len(classes)
    fig = Figure(figsize=(1.0 * n + 4.0, 0.8 * n + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cbar.set_label("fraction of the true class")
    for i in range(n):
        for j in range(n):
            if cm[i, j] == 0:
                continue
            colour = "white" if norm[i, j] > 0.6 else "black"
            ax.text(j, i, f"{cm[i, j]}\n{100 * norm[i, j]:.0f}%", ha="center", va="center",
                    fontsize=8, color=colour)  # fmt: skip
    ax.set_xticks(range(n), [short_name(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n), [_row_label(c) for c in classes])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    _save(fig, path)


def plot_roc_curves(
    labels: np.ndarray, probs: np.ndarray, classes: list[str], path: Path, title: str
) -> None:
    """One-vs-rest ROC curve per class present, plus the macro average (mean TPR on a common FPR grid)."""
    from matplotlib.figure import Figure
    from sklearn.metrics import auc, roc_curve

    fig = Figure(figsize=(8.5, 6.5))
    ax = fig.add_subplot()
    colours = _colours(len(classes))
    grid = np.linspace(0.0, 1.0, 501)
    tprs, aucs = [], []
    for k, name in enumerate(classes):
        y = labels == k
        if y.all() or not y.any():
            continue  # ROC undefined without positives and negatives
        fpr, tpr, _ = roc_curve(y, probs[:, k])
        a = auc(fpr, tpr)
        tprs.append(np.interp(grid, fpr, tpr))
        aucs.append(a)
        ax.plot(fpr, tpr, lw=1.2, color=colours[k], label=f"{short_name(name)} (AUC {a:.3f})")
    if tprs:
        mean_tpr = np.mean(tprs, axis=0)
        mean_tpr[0] = 0.0
        ax.plot(grid, mean_tpr, lw=3, color="black", label=f"macro average (AUC {np.mean(aucs):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    _save(fig, path)


def tsne_embedding(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``features`` [N, D]: PCA to 50 dims first, perplexity adapted to small N.

    Perplexity is min(30, (N - 1) / 3), at least 2: t-SNE needs perplexity < N, and about N / 3 keeps
    the neighbourhoods meaningful on a small test split.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(features, dtype=np.float64)
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {n}")
    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(max(2.0, min(30.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto")
    return tsne.fit_transform(x)


def plot_tsne(points: np.ndarray, labels: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Scatter of the 2-D embedding coloured by true class, legend with full class names."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 6.5))
    ax = fig.add_subplot()
    colours = _colours(len(classes))
    for k, name in enumerate(classes):
        mask = labels == k
        if mask.any():
            ax.scatter(points[mask, 0], points[mask, 1], s=14, color=colours[k], alpha=0.8,
                       edgecolors="none", label=f"{_row_label(name)} (n={int(mask.sum())})")  # fmt: skip
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False, markerscale=1.6)
    _save(fig, path)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_gradcam_grid(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One row per pair: each image with the Grad-CAM map of the predicted class drawn over it.

    Args:
        rows: per pair ``pathology`` uint8 [S, S, 3], ``radiology`` uint8 [S, S, 1], ``maps`` {branch:
            [h, w]} (``pathology`` / ``radiology``, or ``fused``, drawn over both images), and
            ``caption`` (a line of text for the row).
        path: the PNG to write.
        title: figure title.

    Both branches of a pair share one colour scale (0 to the larger maximum), so the branch that
    mattered less also looks darker; the map is stretched over the image (bilinear) at half opacity.
    """
    from matplotlib.figure import Figure

    columns = _gradcam_columns(rows[0]["maps"]) if rows else []
    fig = Figure(figsize=(2.2 * len(columns) + 0.5, 2.4 * len(rows) + 0.6), layout="constrained")
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), max(1, len(columns)), squeeze=False))
    for i, row in enumerate(rows):
        vmax = max(float(np.max(m)) for m in row["maps"].values()) or 1.0
        for j, (label, image_key, map_key) in enumerate(columns):
            ax = axes[i, j]
            image = row[image_key]
            size = image.shape[0]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
                      extent=(0, size, size, 0))  # fmt: skip
            if map_key is not None:
                ax.imshow(row["maps"][map_key], cmap="viridis", vmin=0.0, vmax=vmax, alpha=0.5,
                          interpolation="bilinear", extent=(0, size, size, 0))  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
        axes[i, 0].set_ylabel(row["caption"], fontsize=7, rotation=0, ha="right", va="center", labelpad=4)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _gradcam_columns(maps: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(column title, image, map drawn over it) for the branches a model has."""
    if "fused" in maps:
        return [
            ("pathology", "pathology", None),
            ("fused map (both images)", "pathology", "fused"),
            ("radiology", "radiology", None),
            ("fused map (both images)", "radiology", "fused"),
        ]
    columns = [("pathology", "pathology", None), ("pathology Grad-CAM", "pathology", "pathology")]
    if "radiology" in maps:
        columns += [("radiology", "radiology", None), ("radiology Grad-CAM", "radiology", "radiology")]
    return columns
