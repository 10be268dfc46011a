"""Evaluate a finished run directory: metrics.json, report.md, test_predictions.npz and the figures.

``evaluate_run`` needs only the run dir (checkpoint.pt, config.json) and the data its config names, so
``crc-train evaluate RUN_DIR`` regenerates everything, and training calls it at its end.

Files (each written atomically): ``metrics.json`` (the training keys kept, the evaluation keys added),
``report.md`` (``render_run_report``: pure string formatting over metrics.json), ``test_predictions.npz``
(labels, preds, probs, pair_index, test_sha256), ``confusion_matrix.png``, ``roc_curves.png``,
``tsne.png``, ``gradcam.png`` (Grad-CAM of both branches on one test pair per class; ``explain``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crc_train.config import RunConfig, load_run_config
from crc_train.data import PairedSplit, load_split
from crc_train.errors import UserError
from crc_train.explain import branch_terms, centre_branch, grad_cam, margin_split, modality_summary
from crc_train.metrics import (
    EXACT_BELOW,
    KEY_CLASSES,
    PAIRED_VS_UNPAIRED,
    classification_metrics,
    macro_f1,
    short_name,
)
from crc_train.plots import (
    plot_confusion_matrix,
    plot_gradcam_grid,
    plot_roc_curves,
    plot_tsne,
    tsne_embedding,
)
from crc_train.rundir import (
    RunDirError,
    atomic_path,
    load_checkpoint,
    model_from_checkpoint,
    write_json,
    write_text_atomic,
)

__all__ = [
    "FIGURES",
    "RunDirError",
    "evaluate_run",
    "format_ci",
    "result_line",
    "predict",
    "read_predictions",
    "markdown_table",
    "render_run_report",
    "write_predictions",
]


log = logging.getLogger(__name__)

#: The PNGs evaluate_run writes into the run dir.
FIGURES = ("confusion_matrix.png", "roc_curves.png", "tsne.png", "gradcam.png")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


@torch.no_grad()
def predict(
    model: torch.nn.Module, split: PairedSplit, device: torch.device, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Logits, probabilities and fused features of every pair of ``split``, in split order.

    Returns:
        ``{"logits" float32 [N, C], "probs" float32 [N, C], "features" float32 [N, D], "loss" float}``.
    """
    model.eval()
    logits_all, feats_all = [], []
    for start in range(0, len(split), batch_size):
        p = torch.from_numpy(np.ascontiguousarray(split.pathology[start : start + batch_size])).to(device)
        r = torch.from_numpy(np.ascontiguousarray(split.radiology[start : start + batch_size])).to(device)
        feats = model.forward_features(p, r)
        logits_all.append(model.forward_head(feats).float().cpu())
        feats_all.append(feats.float().cpu())
    logits = torch.cat(logits_all)
    labels = torch.from_numpy(split.labels)
    loss = float(torch.nn.functional.cross_entropy(logits, labels)) if len(labels) else 0.0
    return {
        "logits": logits.numpy(),
        "probs": torch.softmax(logits, dim=1).numpy().astype(np.float32),
        "features": torch.cat(feats_all).numpy(),
        "loss": loss,
    }


def _fingerprint(split: PairedSplit) -> str:
    """sha256 over the test inputs and labels: two runs with equal fingerprints saw the same pairs."""
    h = hashlib.sha256()
    for arr in (split.pathology, split.radiology, split.labels):
        a = np.ascontiguousarray(arr)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_predictions(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """test_predictions.npz atomically, no pickled objects."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def read_predictions(run_dir: Path) -> dict[str, Any]:
    """test_predictions.npz of a run as plain arrays (``allow_pickle=False``).

    Raises:
        RunDirError: the file is missing or lacks labels / preds / probs.
    """
    path = Path(run_dir) / "test_predictions.npz"
    if not path.is_file():
        raise RunDirError(f"{path} not found: is {run_dir} a finished crc-train run dir?")
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from exc
    missing = [k for k in ("labels", "preds", "probs") if k not in out]
    if missing:
        raise RunDirError(f"{path} lacks {', '.join(missing)}")
    return out


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A run dir's JSON file ({} when it does not exist); one RunDirError when it cannot be read."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path}: {exc}") from exc


def _val_loss_from_csv(run_dir: Path, epoch: int) -> float | None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("epoch") == str(epoch) and row.get("val_loss"):
                return float(row["val_loss"])
    return None


def evaluate_run(
    run_dir: str | Path,
    device: str = "cpu",
    batch_size: int = 256,
    ablation_seed: int = 0,
    tsne_max_points: int = 2000,
) -> dict[str, Any]:
    """Evaluate the run's checkpoint on its test split and (re)write the evaluation files.

    Args:
        run_dir: a run directory with checkpoint.pt (and config.json; the checkpoint's copy otherwise).
        device: "cpu", "cuda" or "auto".
        batch_size: pairs per forward pass.
        ablation_seed: seed of the permutation that shuffles the radiology images across test pairs.
        tsne_max_points: t-SNE on a seeded random subset of at most this many test pairs.

    Returns:
        The content written to metrics.json.

    Raises:
        RunDirError, CheckpointError, DataError: user errors (missing run dir, files or data).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run dir not found: {run_dir}")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    if (run_dir / "config.json").is_file():
        run_cfg, config = load_run_config(run_dir / "config.json")
    else:
        run_cfg, config = RunConfig.from_dict(ckpt["config"]), ckpt["config"]  # checked by load_checkpoint
    dev = _device(device)
    model = model_from_checkpoint(ckpt, run_dir / "checkpoint.pt").to(dev)
    classes = list(ckpt["classes"])
    split = load_split(run_cfg.data, "test")
    log.info("evaluating %s on %d test pairs (%s)", run_dir, len(split), dev)

    out = predict(model, split, dev, batch_size)
    labels, probs = split.labels, out["probs"]
    preds = probs.argmax(1).astype(np.int64)
    metrics = classification_metrics(labels, preds, probs, classes)

    # Modality ablation: the same pathology images, each with another pair's radiology image.
    perm = np.random.default_rng(ablation_seed).permutation(len(split))
    shuffled = replace(split, radiology=np.ascontiguousarray(split.radiology[perm]))
    abl_probs = predict(model, shuffled, dev, batch_size)["probs"]
    abl_preds = abl_probs.argmax(1)  # only accuracy and macro-F1 are reported: no CIs, curves or AUCs
    abl = {
        "accuracy": int((labels == abl_preds).sum()) / len(labels),
        "macro_f1": macro_f1(labels, abl_preds, len(classes)),
    }

    # How much each modality decided: the exact split of every margin by branch (crc_train.explain).
    terms, bias = branch_terms(model, out["features"])
    split_by_branch = margin_split(out["logits"], terms, bias)
    # ... and with the radiology term's test-set mean moved to the bias: the part a given slice adds.
    slice_specific = modality_summary(margin_split(out["logits"], *centre_branch(terms, bias)))

    old = read_json_or_empty(run_dir / "metrics.json")
    best_epoch = int(old.get("best_epoch", ckpt["epoch"]))
    mcfg = ckpt["model_config"]
    result: dict[str, Any] = {
        **old,
        **metrics,
        "loss": out["loss"],
        "n_test": len(split),
        "best_epoch": best_epoch,
        "val_accuracy": old.get("val_accuracy", ckpt["best_val_metric"]),
        "val_loss": old.get("val_loss", _val_loss_from_csv(run_dir, best_epoch)),
        "classes": classes,
        "run_id": ckpt["run_id"],
        "backbone": mcfg.get("backbone"),
        "fusion": mcfg.get("fusion"),
        "image_size": ckpt["image_size"],
        "ablation_accuracy": abl["accuracy"],
        "ablation_macro_f1": abl["macro_f1"],
        "ablation_seed": ablation_seed,
        "modality_split": {**modality_summary(split_by_branch), "slice_specific": slice_specific},
        "gradcam_pairs": _gradcam_sample(labels, len(classes)),
        "test_sha256": _fingerprint(split),
        "figures": list(FIGURES),
    }

    write_predictions(
        run_dir / "test_predictions.npz",
        {
            "labels": labels.astype(np.int64),
            "preds": preds,
            "probs": probs.astype(np.float32),
            # index of the pair in the test split (pathology sample i with its paired radiology image)
            "pair_index": np.arange(len(split), dtype=np.int64),
            "test_sha256": np.array(result["test_sha256"]),
        },
    )
    _figures(run_dir, labels, probs, out["features"], metrics, classes, result, tsne_max_points)
    _gradcam_figure(run_dir, model, split, dev, split_by_branch, result, classes)
    write_json(run_dir / "metrics.json", result)
    report = render_run_report(result, config)
    write_text_atomic(run_dir / "report.md", report)
    log.info("%s; radiology shuffled %.4f", result_line(result), result["ablation_accuracy"])
    return result


def _figures(
    run_dir: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    features: np.ndarray,
    metrics: dict[str, Any],
    classes: list[str],
    result: dict[str, Any],
    tsne_max_points: int,
) -> None:
    name = f"{result['backbone']} / fusion {result['fusion']}"
    n = len(labels)
    plot_confusion_matrix(
        np.array(metrics["confusion_matrix"]),
        classes,
        run_dir / "confusion_matrix.png",
        f"Confusion matrix, test set (n = {n}), {name}\naccuracy {metrics['accuracy']:.3f}",
    )
    plot_roc_curves(labels, probs, classes, run_dir / "roc_curves.png", f"ROC curves (one-vs-rest), {name}")
    keep = np.arange(n)
    if n > tsne_max_points:
        keep = np.sort(np.random.default_rng(0).choice(n, tsne_max_points, replace=False))
    points = tsne_embedding(features[keep], seed=0)
    shown = f"{len(keep)} of {n}" if len(keep) < n else f"n = {n}"
    plot_tsne(
        points,
        labels[keep],
        classes,
        run_dir / "tsne.png",
        f"t-SNE of the fused features, test set ({shown}), {name}",
    )


def _gradcam_sample(labels: np.ndarray, num_classes: int) -> list[int]:
    """The fixed sample of the Grad-CAM figure: the first test pair of each class, in class order."""
    return [int(np.flatnonzero(labels == k)[0]) for k in range(num_classes) if (labels == k).any()]


def _gradcam_figure(
    run_dir: Path,
    model: torch.nn.Module,
    split: PairedSplit,
    device: torch.device,
    by_branch: dict[str, np.ndarray],
    result: dict[str, Any],
    classes: list[str],
) -> None:
    """gradcam.png: Grad-CAM of the predicted class for each branch, on ``result["gradcam_pairs"]``."""
    index = result["gradcam_pairs"]
    p = torch.from_numpy(np.ascontiguousarray(split.pathology[index])).to(device)
    r = torch.from_numpy(np.ascontiguousarray(split.radiology[index])).to(device)
    _, maps = grad_cam(model, p, r)
    rows = []
    for j, i in enumerate(index):
        terms = " + ".join(f"{name[:3]} {by_branch[name][i]:+.2f}" for name in model.branch_names)
        rows.append(
            {
                "pathology": split.pathology[i],
                "radiology": split.radiology[i],
                "maps": {name: m[j].float().cpu().numpy() for name, m in maps.items()},
                "caption": f"#{i} {short_name(classes[split.labels[i]])} -> "
                f"{short_name(classes[by_branch['predicted'][i]])}\nmargin {by_branch['margin'][i]:.2f} = "
                f"{terms} + bias {by_branch['bias'][i]:+.2f}",
            }
        )
    name = f"{result['backbone']} / fusion {result['fusion']}"
    plot_gradcam_grid(
        rows,
        run_dir / "gradcam.png",
        f"Grad-CAM of the predicted class, first test pair of each class, {name}",
    )


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_ci(ci: list[float] | tuple[float, float] | None, digits: int = 4) -> str:
    """ "low-high" of a confidence interval, or "n/a"."""
    return "n/a" if not ci else f"{ci[0]:.{digits}f}-{ci[1]:.{digits}f}"


def result_line(m: dict[str, Any]) -> str:
    """The one-line test result every command prints: accuracy and macro-F1 with their 95 % CIs."""
    return (
        f"test accuracy {m['accuracy']:.4f} (95% CI {format_ci(m.get('accuracy_ci'))})  "
        f"macro-F1 {m['macro_f1']:.4f} (95% CI {format_ci(m.get('macro_f1_ci'))})"
    )


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    """A Markdown table as lines; ``align`` is one letter per column, l or r (default: l then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _explanations_section(m: dict[str, Any]) -> list[str]:
    """report.md's "Explanations" section: the modality split of the margins, Grad-CAM."""
    split = m.get("modality_split")
    if split is None:  # a metrics.json written before explanations existed
        return []
    lines = [
        "## Explanations: how much each modality decided",
        "",
        "The head is linear on the average-pooled final maps of the branches, so every logit is exactly "
        "a pathology term plus a radiology term plus the bias. For each test pair the predicted class's "
        "margin over the runner-up splits the same way: margin = pathology + radiology + bias (in "
        "logits). The radiology share of a pair is |radiology| / (|pathology| + |radiology|).",
        "",
    ]
    gradcam = [
        "Where each branch looked: `gradcam.png` shows Grad-CAM (Selvaraju et al., 2017) of the predicted "
        "class at the output of each branch's last stage (layer4), on a fixed sample: the first test pair "
        f"of each class (test pairs {', '.join(f'#{i}' for i in m.get('gradcam_pairs', []))}). For late "
        "fusion and the pathology-only model it equals the exact class activation map clipped at 0; with "
        "attention fusion the gradient also flows through the second cross-modal block. Both branches of "
        "a pair share one colour scale, so the branch that mattered less looks darker.",
        "",
    ]
    if not split.get("available"):
        return [*lines, f"No modality split for this model: {split.get('reason')}.", "", *gradcam]
    # Two columns: the split as it is, and with the radiology term's test-set mean moved to the bias
    # (the part every slice gives alike acts as a second bias; shuffling the slices cannot change it).
    both = [split, split.get("slice_specific") or split]

    def row(label: str, value) -> list[str]:
        return [label, *(value(s) for s in both)]

    def quantiles(s: dict) -> str:
        return " / ".join(
            _f(s["radiology_share_quantiles"][k], 2) for k in ("q10", "q25", "q50", "q75", "q90")
        )

    lines += [
        *markdown_table(
            [f"test set (n = {split['n']})", "as split", "radiology term minus its test-set mean"],
            [
                row("mean margin (logits)", lambda s: _f(s["mean_margin"], 3)),
                row("mean abs. pathology term", lambda s: _f(s["mean_abs_pathology"], 3)),
                row("mean abs. radiology term", lambda s: _f(s["mean_abs_radiology"], 3)),
                row("mean radiology share of the margin", lambda s: _f(s["mean_radiology_share"], 3)),
                row("radiology share, quantiles 10 / 25 / 50 / 75 / 90 %", quantiles),
                row(
                    "pairs decided by radiology (pathology + bias alone favour the runner-up)",
                    lambda s: f"{100 * s['decided_by_radiology']:.1f} %",
                ),
                row(
                    "pairs whose radiology term opposes the prediction",
                    lambda s: f"{100 * s['radiology_opposes']:.1f} %",
                ),
            ],
            align="lrr",
        ),
        "",
        "Radiology share histogram (10 bins over 0..1, pairs per bin): "
        + "; ".join(
            f"{name}: {', '.join(map(str, s['radiology_share_histogram']))}"
            for name, s in zip(("as split", "minus its mean"), both, strict=True)
        )  # fmt: skip
        + f". Accuracy change with the radiology slices shuffled (the ablation above): "
        f"{100 * (m['ablation_accuracy'] - m['accuracy']):+.2f} points.",
        "",
        "What the synthetic pairing implies: the radiology slice comes from another patient than the "
        "tissue tile, so it carries no information about the tile's class, and any radiology share is the "
        "model using an uninformative input. Part of the radiology term is the same for every slice (its "
        "mean over the test set, second column moved into the bias): a constant offset per class, which "
        "shuffling cannot change. The rest is what a particular slice adds: that part is what the ablation "
        "perturbs, and a model that learned the data as it is should show a share near 0 there and no "
        "ablation drop.",
        "",
        *gradcam,
    ]
    return lines


def render_run_report(m: dict[str, Any], config: dict[str, Any]) -> str:
    """report.md of one evaluated run.

    Args:
        m: the metrics.json content written by ``evaluate_run``.
        config: the run's config.json.
    """
    data = config.get("data", {})
    classes = m["classes"]
    lines = [
        f"# Evaluation report: {m['run_id']}",
        "",
        f"Model: {m.get('backbone')} branches, fusion `{m.get('fusion')}`, {m.get('image_size')} px. "
        f"Data: {data.get('source')} (pairing seed {data.get('pairing_seed')}). "
        f"Best epoch {m.get('best_epoch')} (validation accuracy {_f(m.get('val_accuracy'))}). "
        f"Test split: {m['n_test']} pairs.",
        "",
        "## Table 5: overall test performance",
        "",
        *markdown_table(
            ["metric", "value", "95 % CI"],
            [
                ["accuracy", _f(m["accuracy"]), format_ci(m.get("accuracy_ci"))],
                ["macro precision", _f(m["macro_precision"]), ""],
                ["macro recall", _f(m["macro_recall"]), ""],
                ["macro F1", _f(m["macro_f1"]), format_ci(m.get("macro_f1_ci"))],
                ["ROC AUC, one-vs-rest (macro)", _f(m["roc_auc_ovr"]), ""],
                ["ROC AUC, one-vs-one (macro)", _f(m["roc_auc_ovo"]), ""],
                ["PR AUC (macro average precision)", _f(m["pr_auc"]), ""],
                ["test loss (cross-entropy)", _f(m.get("loss")), ""],
            ],
        ),
        "",
        "Macro averages weight the 9 classes equally (a class absent from the test labels counts as 0 "
        "for precision/recall/F1).",
    ]
    if m.get("ci_note"):
        lines += [
            "",
            f"{m['ci_note']}. They cover the sampling of the {m['n_test']} test pairs only, not the "
            "variation between training seeds.",
        ]
    if m.get("auc_note"):
        lines += ["", f"Note: {m['auc_note']}."]
    key = ", ".join(f"{short_name(c)} ({c})" for c in KEY_CLASSES if c in classes)
    lines += [
        "",
        "## Table 6: per-class performance (key classes first)",
        "",
        f"Key classes: {key or 'none of the colorectal key classes are in this label set'}. "
        "Tumour epithelium is the diagnosis itself, cancer-associated stroma carries the tumour-stroma "
        "ratio (a prognostic marker in colorectal cancer), and normal mucosa is the tissue tumour must "
        "be told apart from; the other classes follow in label order.",
        "",
        *markdown_table(
            ["class", "F1", "precision", "recall", "ROC AUC", "support"],
            [
                [
                    f"{'**' if r['name'] in KEY_CLASSES else ''}{short_name(r['name'])} {r['name']}"
                    f"{'**' if r['name'] in KEY_CLASSES else ''}",
                    _f(r["f1"]),
                    _f(r["precision"]),
                    _f(r["recall"]),
                    _f(r["roc_auc"]),
                    str(r["support"]),
                ]
                for r in m["per_class"]
            ],
        ),
        "",
        "## Confusion matrix",
        "",
        "Rows are the true class, columns the predicted class (counts; row-normalised in the figure).",
        "",
        *markdown_table(
            ["true \\ predicted", *[short_name(c) for c in classes]],
            [[short_name(c), *map(str, row)] for c, row in zip(classes, m["confusion_matrix"], strict=True)],
        ),
        "",
        "Row-normalised (recall of each true class on the diagonal):",
        "",
        *markdown_table(
            ["true \\ predicted", *[short_name(c) for c in classes]],
            [
                [short_name(c), *(f"{v:.2f}" for v in row)]
                for c, row in zip(classes, m["confusion_matrix_normalized"], strict=True)
            ],
        ),
        "",
        "## Modality ablation",
        "",
        *markdown_table(
            ["test input", "accuracy", "macro F1"],
            [
                ["as paired", _f(m["accuracy"]), _f(m["macro_f1"])],
                [
                    f"radiology shuffled across test pairs (seed {m['ablation_seed']})",
                    _f(m["ablation_accuracy"]),
                    _f(m["ablation_macro_f1"]),
                ],
            ],
        ),
        "",
        f"Accuracy change when the radiology images are shuffled: "
        f"{100 * (m['ablation_accuracy'] - m['accuracy']):+.2f} points.",
        "",
        "The pairing of pathology and radiology images is synthetic: PathMNIST (colorectal histology) "
        "and OrganAMNIST (abdominal CT) come from different patients, and each pathology image is "
        "given a radiology image by a seeded permutation. The radiology image therefore carries no "
        "information about the pathology label, and shuffling it across the test pairs measures how "
        "much the model's predictions actually depend on the second modality. A drop means the "
        "model uses the radiology input (as noise it has fitted, since it cannot be signal here); no "
        "change means the fused model behaves as a pathology-only model. A pathology-only run "
        "(`--fusion none`) shows no change by construction.",
        "",
    ]
    if config.get("train", {}).get("shuffle_pairs"):
        lines += [
            "This run was trained with `--shuffle-pairs`: the CT partners were re-drawn across every "
            "training batch, so the model was trained not to rely on the radiology input (a fixed synthetic "
            "partner is an identifier a fused model memorises the training labels from).",
            "",
        ]
    lines += [
        *_explanations_section(m),
        "## Figures",
        "",
        "![Confusion matrix](confusion_matrix.png)",
        "",
        "![ROC curves](roc_curves.png)",
        "",
        "![t-SNE of the fused features](tsne.png)",
        "",
        *(
            ["![Grad-CAM of sample test pairs](gradcam.png)", ""]
            if "gradcam.png" in m.get("figures", [])
            else []
        ),
        "## Comparing two models",
        "",
        "Use `crc-train compare RUN_A --vs RUN_B` (several seeds per side allowed): it runs McNemar's "
        f"test on the paired test predictions (exact binomial when the discordant count is below "
        f"{EXACT_BELOW}, else chi-square with continuity correction). {PAIRED_VS_UNPAIRED}",
        "",
    ]
    return "\n".join(lines)
