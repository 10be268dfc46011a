"""evaluate_run on tiny trained runs: every file, the metrics.json keys, report.md sections, the PNGs,
the modality ablation, and the evaluate / compare subcommands on real run dirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from crc_train.cli import main
from crc_train.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from crc_train.evaluation import FIGURES, evaluate_run
from crc_train.training import train
from matplotlib.image import imread

TRAINING_KEYS = (
    "accuracy",
    "macro_f1",
    "n_test",
    "best_epoch",
    "val_accuracy",
    "val_loss",
    "classes",
    "run_id",
)
EVAL_KEYS = (
    "macro_precision", "macro_recall", "per_class", "key_classes", "roc_auc_ovr", "roc_auc_ovo", "pr_auc",
    "confusion_matrix", "confusion_matrix_normalized", "ablation_accuracy", "ablation_macro_f1",
    "ablation_seed", "modality_split", "gradcam_pairs", "test_sha256",
)  # fmt: skip
SECTIONS = (
    "## Table 5: overall test performance",
    "## Table 6: per-class performance (key classes first)",
    "## Confusion matrix",
    "## Modality ablation",
    "## Explanations: how much each modality decided",
    "## Figures",
    "## Comparing two models",
)


def _tiny_run(root: Path, out: Path, fusion: str) -> dict:
    cfg = RunConfig(
        model=ModelConfig(backbone="resnet18", fusion=fusion, image_size=28),
        data=DataConfig(source="medmnist", root=str(root), size=28, max_train_pairs=16),
        train=TrainConfig(epochs=1, batch_size=16, seed=1, device="cpu", out=str(out)),
    )
    return train(cfg).metrics


@pytest.fixture(scope="module")
def runs(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("report")
    out = {}
    for fusion in ("attention", "none"):
        run_dir = base / fusion
        out[fusion] = {"dir": run_dir, "train": _tiny_run(synthetic_root, run_dir, fusion)}
    out["attention"]["eval"] = evaluate_run(out["attention"]["dir"])
    return out


def test_evaluate_writes_every_file(runs: dict) -> None:
    run_dir = runs["attention"]["dir"]
    for name in ("metrics.json", "report.md", "test_predictions.npz", *FIGURES):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    for name in FIGURES:
        img = imread(run_dir / name)  # a decodable PNG of a real figure size
        assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 400, name


def test_metrics_json_keeps_training_keys_and_adds_evaluation(runs: dict) -> None:
    trained, m = runs["attention"]["train"], runs["attention"]["eval"]
    on_disk = json.loads((runs["attention"]["dir"] / "metrics.json").read_text())
    assert on_disk == m
    for key in TRAINING_KEYS:
        assert key in m, key
    for key in EVAL_KEYS:
        assert key in m, key
    # the re-evaluation of the best checkpoint reproduces what training measured
    assert m["accuracy"] == pytest.approx(trained["accuracy"])
    assert m["macro_f1"] == pytest.approx(trained["macro_f1"])
    assert (m["best_epoch"], m["run_id"], m["n_test"]) == (trained["best_epoch"], trained["run_id"], 30)
    assert len(m["per_class"]) == 9 and m["per_class"][0]["name"] == "colorectal adenocarcinoma epithelium"
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (9, 9) and cm.sum() == 30 and np.trace(cm) == round(30 * m["accuracy"])
    assert 0.0 <= m["ablation_accuracy"] <= 1.0


def test_predictions_carry_the_pair_index(runs: dict) -> None:
    m = runs["attention"]["eval"]
    with np.load(runs["attention"]["dir"] / "test_predictions.npz", allow_pickle=False) as npz:
        assert np.array_equal(npz["pair_index"], np.arange(30))
        assert npz["probs"].shape == (30, 9) and np.array_equal(npz["preds"], npz["probs"].argmax(1))
        assert float((npz["preds"] == npz["labels"]).mean()) == pytest.approx(m["accuracy"])
        assert str(npz["test_sha256"]) == m["test_sha256"]


def test_report_has_tables_ablation_and_explanations(runs: dict) -> None:
    text = (runs["attention"]["dir"] / "report.md").read_text()
    for section in SECTIONS:
        assert section in text, section
    m = runs["attention"]["eval"]
    assert f"| accuracy | {m['accuracy']:.4f} |" in text
    assert f"| radiology shuffled across test pairs (seed 0) | {m['ablation_accuracy']:.4f} |" in text
    assert "different patients" in text and "z = 4.70" in text
    for name in FIGURES:
        assert f"]({name})" in text


def test_modality_split_summarises_the_exact_margins(runs: dict) -> None:
    """The split is computed from the embedding; its mean margin must be the predictions' own margins:
    log p[a] - log p[b] = logit[a] - logit[b] for the predicted class a and the runner-up b."""
    m = runs["attention"]["eval"]
    split = m["modality_split"]
    assert split["available"] and split["n"] == 30
    with np.load(runs["attention"]["dir"] / "test_predictions.npz", allow_pickle=False) as npz:
        top2 = np.sort(np.log(npz["probs"].astype(np.float64)), axis=1)[:, -2:]
    assert split["mean_margin"] == pytest.approx((top2[:, 1] - top2[:, 0]).mean(), abs=1e-4)
    assert 0.0 <= split["mean_radiology_share"] <= 1.0 and sum(split["radiology_share_histogram"]) == 30
    q = split["radiology_share_quantiles"]
    assert q["q10"] <= q["q25"] <= q["q50"] <= q["q75"] <= q["q90"]
    # One pair per class present in the test labels, the first of each, for the Grad-CAM figure.
    with np.load(runs["attention"]["dir"] / "test_predictions.npz", allow_pickle=False) as npz:
        labels = npz["labels"]
    assert m["gradcam_pairs"] == [int(np.flatnonzero(labels == k)[0]) for k in sorted(set(labels.tolist()))]
    text = (runs["attention"]["dir"] / "report.md").read_text()
    specific = split["slice_specific"]
    assert specific["available"] and specific["mean_margin"] == pytest.approx(split["mean_margin"])
    assert (
        f"| mean radiology share of the margin | {split['mean_radiology_share']:.3f} | "
        f"{specific['mean_radiology_share']:.3f} |" in text
    )
    assert "carries no information about the tile's class" in text and "Grad-CAM" in text


def test_cli_evaluate_pathology_only_run_is_blind_to_radiology(
    runs: dict, capsys: pytest.CaptureFixture
) -> None:
    run_dir = runs["none"]["dir"]
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(run_dir), "--quiet"])
    assert exc.value.code == 0
    assert "radiology shuffled" in capsys.readouterr().out
    m = json.loads((run_dir / "metrics.json").read_text())
    # --fusion none ignores radiology: shuffling it cannot change a single prediction
    assert m["ablation_accuracy"] == m["accuracy"] and m["fusion"] == "none"
    none = {"available": False, "reason": "fusion none: the model has no radiology branch"}
    assert m["modality_split"] == {**none, "slice_specific": none}
    assert "No modality split for this model: fusion none" in (run_dir / "report.md").read_text()
    assert m["accuracy"] == pytest.approx(runs["none"]["train"]["accuracy"])


def test_cli_compare_fused_vs_pathology_only(runs: dict, capsys: pytest.CaptureFixture) -> None:
    if not (runs["none"]["dir"] / "report.md").is_file():
        evaluate_run(runs["none"]["dir"])
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(runs["attention"]["dir"]), "--vs", str(runs["none"]["dir"])])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "McNemar (" in out and "| A right |" in out and "p = " in out


def test_cli_evaluate_missing_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error: run dir not found") and err.count("\n") == 1
