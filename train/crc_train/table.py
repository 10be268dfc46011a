"""The fusion table: any number of run dirs, grouped by backbone / image size / fusion, one row per group.

The paper's Table 5 comparison in one command (``crc-train table RUN...``). Reads only each run's
test_predictions.npz, metrics.json and config.json (no torch); every run must have predicted the same test
pairs (``compare.check_same_pairs``).

Per group, with these definitions:

- **accuracy, macro-F1: mean +- sd** over the group's runs (sample sd, ddof 1; 0 with one run). The sd is
  the seed-to-seed spread of training.
- **95 % CI of the accuracy**: the Wilson score interval of the group's mean accuracy on the N test pairs
  (mean number right out of N); **of the macro-F1**: the percentile bootstrap over test pairs of the
  group's mean macro-F1, the same resamples for every run (``metrics.bootstrap_macro_f1``). Both measure
  the uncertainty from the finite test set; with one run they are that run's intervals in report.md.
- **McNemar vs none**: against the ``none`` (pathology-only) group of the same backbone and size. Runs pair
  up by training seed (``config.json`` train.seed): the group's run with seed s is tested against the
  ``none`` run with seed s, one test per seed pair, on the paired test predictions (``metrics.mcnemar``:
  exact binomial below 25 discordant pairs, else chi-square with continuity correction). Seeds without a
  counterpart are listed as unpaired; a group may not hold two runs of one seed.
- **radiology shuffled**: the modality ablation of ``evaluate_run`` (the same pathology images, radiology
  permuted across the test pairs), mean accuracy over the runs and its change from the paired accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crc_train.compare import CompareError, check_same_pairs, load_run
from crc_train.config import FUSIONS
from crc_train.evaluation import format_ci, markdown_table
from crc_train.metrics import EXACT_BELOW, bootstrap_macro_f1, ci_note, mcnemar, mean_sd, wilson_interval

__all__ = ["DEFINITIONS", "fusion_table", "render_table"]

#: How the table's columns are computed, printed under the Markdown table and stored in the JSON.
DEFINITIONS = (
    "mean +- sd over the runs of a group (sample sd; 0 with one run). 95 % CI of the accuracy: Wilson score "
    "interval of the group's mean accuracy on the test pairs; of the macro-F1: percentile bootstrap over the "
    "test pairs of the group's mean macro-F1 (the same resamples for every run). The intervals cover the "
    "test-set sampling; the sd covers the training seeds. McNemar vs none: runs pair up by training seed "
    "(config.json train.seed) with the pathology-only (fusion none) run of the same backbone, size and seed; "
    f"exact binomial below {EXACT_BELOW} discordant pairs, else chi-square with continuity correction; "
    "b = pairs only the group's run got right, c = pairs only the none run got right. Radiology shuffled: "
    "accuracy with the radiology images permuted across the test pairs (mean over runs) and its change."
)


def _describe(run: dict[str, Any]) -> dict[str, Any]:
    """backbone, image size, fusion and seed of a loaded run (metrics.json first, config.json second)."""
    m, cfg = run["metrics"], run["config"]
    model = cfg.get("model", {})
    seed = cfg.get("train", {}).get("seed")
    return {
        "backbone": m.get("backbone") or model.get("backbone") or "?",
        "image_size": m.get("image_size") or model.get("image_size"),
        "fusion": m.get("fusion") or model.get("fusion") or "?",
        "seed": None if seed is None else int(seed),
    }


def _group_order(key: tuple[str, Any, str]) -> tuple[str, int, int, str]:
    backbone, size, fusion = key
    rank = FUSIONS.index(fusion) if fusion in FUSIONS else len(FUSIONS)
    return backbone, int(size or 0), rank, fusion


def _mcnemar_rows(group: list[dict[str, Any]], reference: list[dict[str, Any]]) -> tuple[list, list]:
    """One McNemar test per seed the group shares with the reference group; the unpaired seeds."""
    by_seed = {r["meta"]["seed"]: r for r in reference}
    tests, unpaired = [], []
    for run in group:
        ref = by_seed.get(run["meta"]["seed"]) if run["meta"]["seed"] is not None else None
        if ref is None:
            unpaired.append(run["meta"]["seed"])
            continue
        res = mcnemar(run["preds"] == run["labels"], ref["preds"] == ref["labels"])
        tests.append(
            {
                "seed": run["meta"]["seed"],
                "run": str(run["dir"]),
                "none_run": str(ref["dir"]),
                "table": [list(row) for row in res.table],
                "b": res.b,
                "c": res.c,
                "statistic": res.statistic,
                "pvalue": res.pvalue,
                "method": res.method,
            }
        )
    return tests, unpaired


def fusion_table(run_dirs: list[str | Path]) -> dict[str, Any]:
    """Group ``run_dirs`` by (backbone, image size, fusion) and compute one row per group.

    Returns:
        ``{"n_test", "groups": [...], "definitions", "ci_note"}``; each group holds ``label``,
        ``backbone``, ``image_size``, ``fusion``, ``runs`` (run, seed, accuracy, macro_f1,
        ablation_accuracy), ``acc_mean``, ``acc_sd``, ``acc_ci``, ``f1_mean``, ``f1_sd``, ``f1_ci``,
        ``ablation_acc_mean``, ``ablation_delta`` (mean ablation minus mean accuracy; None without
        ablation numbers), ``reference`` (True for a none group), ``mcnemar`` (list of per-seed tests, or
        None without a none group) and ``unpaired_seeds``.

    Raises:
        CompareError: no runs, runs on other test pairs, or two runs of one seed in a group.
        RunDirError: a run dir or its test_predictions.npz is missing.
    """
    if not run_dirs:
        raise CompareError("table needs at least one run dir: crc-train table RUN...")
    runs = [load_run(Path(p)) for p in run_dirs]
    for run in runs[1:]:
        check_same_pairs(runs[0], run)
    groups: dict[tuple[str, Any, str], list[dict[str, Any]]] = {}
    for run in runs:
        run["meta"] = _describe(run)
        key = (run["meta"]["backbone"], run["meta"]["image_size"], run["meta"]["fusion"])
        members = groups.setdefault(key, [])
        seed = run["meta"]["seed"]
        twin = next((r for r in members if seed is not None and r["meta"]["seed"] == seed), None)
        if twin is not None:
            raise CompareError(
                f"{twin['dir']} and {run['dir']} are both {key[0]} / {key[1]} px / fusion {key[2]} with seed "
                f"{seed}: the table pairs runs by seed, so give one run per seed and group"
            )
        members.append(run)

    labels, n_classes, n = runs[0]["labels"], runs[0]["n_classes"], len(runs[0]["labels"])
    rows = []
    for key in sorted(groups, key=_group_order):
        members = groups[key]
        backbone, size, fusion = key
        acc_mean, acc_sd = mean_sd([r["acc"] for r in members])
        f1_mean, f1_sd = mean_sd([r["f1"] for r in members])
        ablation = [r["metrics"].get("ablation_accuracy") for r in members]
        has_ablation = all(a is not None for a in ablation)
        reference = groups.get((backbone, size, "none"))
        if fusion == "none":
            tests, unpaired = None, []
        elif reference is None:
            tests, unpaired = None, [r["meta"]["seed"] for r in members]
        else:
            tests, unpaired = _mcnemar_rows(members, reference)
        rows.append(
            {
                "label": f"{backbone} / {size} px / {fusion}",
                "backbone": backbone,
                "image_size": size,
                "fusion": fusion,
                "runs": [
                    {
                        "run": str(r["dir"]),
                        "seed": r["meta"]["seed"],
                        "accuracy": r["acc"],
                        "macro_f1": r["f1"],
                        "ablation_accuracy": r["metrics"].get("ablation_accuracy"),
                    }
                    for r in members
                ],
                "acc_mean": acc_mean,
                "acc_sd": acc_sd,
                "acc_ci": list(wilson_interval(acc_mean * n, n)),
                "f1_mean": f1_mean,
                "f1_sd": f1_sd,
                "f1_ci": list(bootstrap_macro_f1(labels, [r["preds"] for r in members], n_classes)),
                "ablation_acc_mean": float(np.mean(ablation)) if has_ablation else None,
                "ablation_delta": float(np.mean(ablation)) - acc_mean if has_ablation else None,
                "reference": fusion == "none",
                "mcnemar": tests,
                "unpaired_seeds": unpaired,
            }
        )
    return {"n_test": n, "groups": rows, "definitions": DEFINITIONS, "ci_note": ci_note()}


def _mcnemar_cell(g: dict[str, Any]) -> str:
    if g["reference"]:
        return "reference"
    if g["mcnemar"] is None:
        return "n/a (no none run)"
    cells = [f"seed {t['seed']}: b {t['b']} / c {t['c']}, p = {t['pvalue']:.3g}" for t in g["mcnemar"]]
    cells += [f"seed {s}: unpaired" for s in g["unpaired_seeds"]]
    return "; ".join(cells) or "n/a"


def render_table(t: dict[str, Any]) -> str:
    """Markdown of a ``fusion_table`` result."""
    lines = [
        f"# Fusion table ({t['n_test']} test pairs, identical in every run)",
        "",
        *markdown_table(
            [
                "group",
                "runs",
                "accuracy (mean +- sd)",
                "95 % CI",
                "macro F1 (mean +- sd)",
                "95 % CI",
                "radiology shuffled",
                "McNemar vs none",
            ],
            [
                [
                    g["label"],
                    str(len(g["runs"])),
                    f"{g['acc_mean']:.4f} +- {g['acc_sd']:.4f}",
                    format_ci(g["acc_ci"]),
                    f"{g['f1_mean']:.4f} +- {g['f1_sd']:.4f}",
                    format_ci(g["f1_ci"]),
                    "n/a"
                    if g["ablation_acc_mean"] is None
                    else f"{g['ablation_acc_mean']:.4f} ({100 * g['ablation_delta']:+.1f} pts)",
                    _mcnemar_cell(g),
                ]
                for g in t["groups"]
            ],
            align="lrrrrrrl",
        ),  # fmt: skip
        "",
        t["definitions"],
        "",
        "## Runs",
        "",
        *markdown_table(
            ["group", "seed", "run", "accuracy", "macro F1"],
            [
                [g["label"], str(r["seed"]), r["run"], f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}"]
                for g in t["groups"]
                for r in g["runs"]
            ],
            align="lrlrr",
        ),
        "",
    ]
    return "\n".join(lines)
