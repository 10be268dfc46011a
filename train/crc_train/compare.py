"""Compare runs on their paired test predictions: McNemar per seed pair, mean +- sd per side.

Reads only test_predictions.npz (and metrics.json, config.json when present) of each run: no torch.
Every run must have predicted the same test pairs with the same labels; otherwise it is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from crc_train.errors import UserError
from crc_train.evaluation import RunDirError, markdown_table, read_json_or_empty, read_predictions
from crc_train.metrics import PAIRED_VS_UNPAIRED, macro_f1, mcnemar, mean_sd, two_proportion_z

__all__ = ["CompareError", "check_same_pairs", "compare_runs", "load_run", "render_compare"]


class CompareError(UserError):
    """Runs that cannot be compared pair by pair."""


def load_run(run_dir: Path) -> dict[str, Any]:
    """What comparisons read from a run dir: its test predictions, metrics.json and config.json.

    Returns:
        ``dir``, ``name``, ``labels``, ``preds``, ``pair_index``, ``sha``, ``classes``, ``n_classes``,
        ``acc``, ``f1``, ``metrics`` (metrics.json, {} when absent) and ``config`` (config.json, {}).

    Raises:
        RunDirError: the run dir or its test_predictions.npz is missing or unreadable.
    """
    if not run_dir.is_dir():
        raise RunDirError(f"run dir not found: {run_dir}")
    pred = read_predictions(run_dir)
    labels = pred["labels"].astype(np.int64).reshape(-1)
    preds = pred["preds"].astype(np.int64).reshape(-1)
    metrics = read_json_or_empty(run_dir / "metrics.json")
    n_classes = pred["probs"].shape[1]
    return {
        "dir": run_dir,
        "name": run_dir.name,
        "labels": labels,
        "preds": preds,
        "pair_index": pred.get("pair_index"),
        "sha": str(pred["test_sha256"]) if "test_sha256" in pred else metrics.get("test_sha256"),
        "classes": metrics.get("classes"),
        "n_classes": n_classes,
        "acc": float((labels == preds).mean()),
        "f1": macro_f1(labels, preds, n_classes),
        "metrics": metrics,
        "config": read_json_or_empty(run_dir / "config.json"),
    }


def check_same_pairs(ref: dict[str, Any], run: dict[str, Any]) -> None:
    """Refuse (CompareError) two ``load_run`` results that did not predict the same test pairs."""
    where = f"{run['dir']} and {ref['dir']}"
    if len(run["labels"]) != len(ref["labels"]):
        raise CompareError(
            f"{where} predicted different test sets ({len(run['labels'])} vs {len(ref['labels'])} pairs)"
        )
    if not np.array_equal(run["labels"], ref["labels"]):
        raise CompareError(f"{where} have different test labels: they did not predict the same test pairs")
    if run["pair_index"] is not None and ref["pair_index"] is not None:
        if not np.array_equal(run["pair_index"], ref["pair_index"]):
            raise CompareError(f"{where} list their test pairs in a different order")
    if run["sha"] and ref["sha"] and run["sha"] != ref["sha"]:
        raise CompareError(
            f"{where} were tested on different images (test_sha256 differs: other data or pairing seed)"
        )
    if run["classes"] and ref["classes"] and run["classes"] != ref["classes"]:
        raise CompareError(f"{where} have different class lists")
    if run["n_classes"] != ref["n_classes"]:
        raise CompareError(f"{where} have a different number of classes")


def _side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    acc_mean, acc_sd = mean_sd([r["acc"] for r in runs])
    f1_mean, f1_sd = mean_sd([r["f1"] for r in runs])
    label = runs[0]["name"] if len(runs) == 1 else f"{runs[0]['name']} (+{len(runs) - 1})"
    return {
        "label": label,
        "runs": [{"run": str(r["dir"]), "accuracy": r["acc"], "macro_f1": r["f1"]} for r in runs],
        "acc_mean": acc_mean,
        "acc_sd": acc_sd,
        "f1_mean": f1_mean,
        "f1_sd": f1_sd,
    }


def compare_runs(runs_a: list[str | Path], runs_b: list[str | Path]) -> dict[str, Any]:
    """McNemar's test between side A and side B, and mean +- sd of accuracy and macro-F1 per side.

    With as many runs on each side, run A_i is tested against B_i (seed pairs, in the order given);
    otherwise only the first pair A_1 vs B_1 is tested. The result says which in ``pairing``.

    Raises:
        CompareError: a side is empty, or the runs did not predict the same test pairs.
        RunDirError: a run dir or its test_predictions.npz is missing.
    """
    if not runs_a or not runs_b:
        raise CompareError("compare needs at least one run on each side: crc-train compare RUN_A --vs RUN_B")
    a = [load_run(Path(p)) for p in runs_a]
    b = [load_run(Path(p)) for p in runs_b]
    for run in a[1:] + b:
        check_same_pairs(a[0], run)
    if len(a) == len(b):
        pairs = list(zip(a, b, strict=True))
        pairing = f"one test per seed pair, A_i vs B_i in the order given ({len(pairs)})"
    else:
        pairs = [(a[0], b[0])]
        pairing = f"first pair only ({len(a)} vs {len(b)} runs: no one-to-one seed pairing)"
    tests = []
    for ra, rb in pairs:
        ok_a, ok_b = ra["preds"] == ra["labels"], rb["preds"] == rb["labels"]
        res = mcnemar(ok_a, ok_b)
        z, zp = two_proportion_z(ok_a, ok_b)
        tests.append(
            {
                "run_a": ra["name"],
                "run_b": rb["name"],
                "acc_a": ra["acc"],
                "acc_b": rb["acc"],
                "table": [list(row) for row in res.table],
                "statistic": res.statistic,
                "pvalue": res.pvalue,
                "method": res.method,
                "z": z,
                "z_pvalue": zp,
            }
        )
    side_a, side_b = _side(a), _side(b)
    return {
        "label_a": side_a["label"],
        "label_b": side_b["label"],
        "n_test": len(a[0]["labels"]),
        "a": side_a,
        "b": side_b,
        "pairing": pairing,
        "tests": tests,
    }


def render_compare(c: dict[str, Any]) -> str:
    """Markdown (also readable as plain text) of a ``compare_runs`` result."""
    a_name, b_name = c["label_a"], c["label_b"]
    lines = [
        f"# Comparison: A = {a_name} vs B = {b_name}",
        "",
        f"Test pairs: {c['n_test']} (identical in every run).",
        "",
    ]
    lines += markdown_table(
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
            *markdown_table(
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
