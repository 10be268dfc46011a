"""Markdown for one run (report.md) and for a comparison of runs (`crc-train compare`).

Pure string formatting over the dicts that ``evaluation.evaluate_run`` and ``compare.compare_runs``
return; no torch.
"""

from __future__ import annotations

from typing import Any

from crc_train.metrics import KEY_CLASSES, short_name
from crc_train.stats import EXACT_BELOW, PAIRED_VS_UNPAIRED

__all__ = ["render_compare", "render_run_report"]


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


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
        *_table(
            ["metric", "value"],
            [
                ["accuracy", _f(m["accuracy"])],
                ["macro precision", _f(m["macro_precision"])],
                ["macro recall", _f(m["macro_recall"])],
                ["macro F1", _f(m["macro_f1"])],
                ["ROC AUC, one-vs-rest (macro)", _f(m["roc_auc_ovr"])],
                ["ROC AUC, one-vs-one (macro)", _f(m["roc_auc_ovo"])],
                ["PR AUC (macro average precision)", _f(m["pr_auc"])],
                ["test loss (cross-entropy)", _f(m.get("loss"))],
            ],
        ),
        "",
        "Macro averages weight the 9 classes equally (a class absent from the test labels counts as 0 "
        "for precision/recall/F1).",
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
        *_table(
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
        *_table(
            ["true \\ predicted", *[short_name(c) for c in classes]],
            [[short_name(c), *map(str, row)] for c, row in zip(classes, m["confusion_matrix"], strict=True)],
        ),
        "",
        "Row-normalised (recall of each true class on the diagonal):",
        "",
        *_table(
            ["true \\ predicted", *[short_name(c) for c in classes]],
            [
                [short_name(c), *(f"{v:.2f}" for v in row)]
                for c, row in zip(classes, m["confusion_matrix_normalized"], strict=True)
            ],
        ),
        "",
        "## Modality ablation",
        "",
        *_table(
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
        "## Figures",
        "",
        "![Confusion matrix](confusion_matrix.png)",
        "",
        "![ROC curves](roc_curves.png)",
        "",
        "![t-SNE of the fused features](tsne.png)",
        "",
        "## Comparing two models",
        "",
        "Use `crc-train compare RUN_A --vs RUN_B` (several seeds per side allowed): it runs McNemar's "
        f"test on the paired test predictions (exact binomial when the discordant count is below "
        f"{EXACT_BELOW}, else chi-square with continuity correction). {PAIRED_VS_UNPAIRED}",
        "",
    ]
    return "\n".join(lines)


def render_compare(c: dict[str, Any]) -> str:
    """Markdown (also readable as plain text) of a ``compare_runs`` result."""
    a_name, b_name = c["label_a"], c["label_b"]
    lines = [
        f"# Comparison: A = {a_name} vs B = {b_name}",
        "",
        f"Test pairs: {c['n_test']} (identical in every run).",
        "",
    ]
    lines += _table(
        ["side", "runs", "accuracy (mean +- sd)", "macro F1 (mean +- sd)"],
        [
            [
                s["label"],
                str(len(s["runs"])),
                f"{s['acc_mean']:.4f} +- {s['acc_sd']:.4f}",
                f"{s['f1_mean']:.4f} +- {s['f1_sd']:.4f}",
            ]  # fmt: skip
            for s in (c["a"], c["b"])
        ],
    )
    lines += ["", "sd is the sample standard deviation over seeds (0 with one run).", ""]
    lines += [f"## McNemar's test ({c['pairing']})", ""]
    for t in c["tests"]:
        (n11, b), (cc, n22) = t["table"]
        lines += [
            f"### {t['run_a']} vs {t['run_b']}",
            "",
            *_table(
                ["", "B right", "B wrong"],
                [["A right", str(n11), str(b)], ["A wrong", str(cc), str(n22)]],
            ),
            "",
            f"accuracy A {t['acc_a']:.4f}, accuracy B {t['acc_b']:.4f}; discordant pairs b + c = {b + cc}",
            "",
            f"McNemar ({t['method']}): statistic {t['statistic']:.4f}, p = {t['pvalue']:.4g}",
            "",
            f"For contrast, the unpaired two-proportion z-test on the same predictions: z = {t['z']:.3f}, "
            f"p = {t['z_pvalue']:.4g}",
            "",
        ]
    lines += ["## Why McNemar", "", PAIRED_VS_UNPAIRED, ""]
    return "\n".join(lines)
