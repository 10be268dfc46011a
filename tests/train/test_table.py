"""`crc-train table`: runs grouped by backbone / size / fusion, mean +- sd, CIs, McNemar vs none by seed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from crc_train.cli import main
from crc_train.compare import CompareError
from crc_train.metrics import bootstrap_macro_f1, mcnemar, wilson_interval
from crc_train.table import fusion_table

N, C = 60, 3
LABELS = np.arange(N) % C


def make_run(
    path: Path, wrong: list[int], fusion: str, seed: int, backbone: str = "resnet18", ablation: float = 0.5
) -> Path:
    """A run dir with what the table reads: test_predictions.npz, metrics.json, config.json."""
    path.mkdir(parents=True)
    ok = np.ones(N, dtype=bool)
    ok[wrong] = False
    preds = np.where(ok, LABELS, (LABELS + 1) % C)
    np.savez(
        path / "test_predictions.npz",
        labels=LABELS, preds=preds, probs=np.eye(C, dtype=np.float32)[preds], pair_index=np.arange(N),
        test_sha256=np.array("abc"),
    )  # fmt: skip
    metrics = {
        "classes": ["a", "b", "c"], "test_sha256": "abc", "backbone": backbone, "fusion": fusion,
        "image_size": 28, "ablation_accuracy": ablation,
    }  # fmt: skip
    (path / "metrics.json").write_text(json.dumps(metrics))
    config = {"model": {"backbone": backbone, "fusion": fusion, "image_size": 28}, "train": {"seed": seed}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _correct(wrong: list[int]) -> np.ndarray:
    ok = np.ones(N, dtype=bool)
    ok[wrong] = False
    return ok


def test_three_runs_two_groups_mcnemar_by_seed(tmp_path: Path) -> None:
    none0 = make_run(tmp_path / "none0", list(range(20)), "none", seed=0, ablation=40 / 60)
    att0 = make_run(tmp_path / "att0", list(range(5)) + [40, 41], "attention", seed=0, ablation=0.5)
    att1 = make_run(tmp_path / "att1", list(range(10)), "attention", seed=1, ablation=0.6)
    t = fusion_table([att1, none0, att0])  # any order in, fixed order out
    assert t["n_test"] == N
    assert [g["label"] for g in t["groups"]] == ["resnet18 / 28 px / none", "resnet18 / 28 px / attention"]
    none, att = t["groups"]
    assert none["reference"] and none["mcnemar"] is None and len(none["runs"]) == 1
    assert [r["seed"] for r in att["runs"]] == [1, 0]

    accs = [50 / 60, 53 / 60]
    assert att["acc_mean"] == pytest.approx(np.mean(accs)) and att["acc_sd"] == pytest.approx(
        np.std(accs, ddof=1)
    )
    assert att["acc_ci"] == pytest.approx(list(wilson_interval(np.mean(accs) * N, N)))
    preds = [
        np.where(_correct(w), LABELS, (LABELS + 1) % C) for w in (list(range(10)), list(range(5)) + [40, 41])
    ]
    assert att["f1_ci"] == pytest.approx(list(bootstrap_macro_f1(LABELS, preds, C)))
    assert none["acc_ci"] == pytest.approx(list(wilson_interval(40, N)))  # one run: that run's own interval

    # seed 0 pairs with none seed 0; seed 1 has no counterpart
    (test,) = att["mcnemar"]
    assert att["unpaired_seeds"] == [1]
    ref = mcnemar(_correct(list(range(5)) + [40, 41]), _correct(list(range(20))))
    assert test["seed"] == 0 and test["none_run"] == str(none0)
    # b: attention right, none wrong (pairs 5..19); c: attention wrong, none right (pairs 40, 41)
    assert (test["b"], test["c"]) == (15, 2) == (ref.b, ref.c)
    assert test["pvalue"] == pytest.approx(ref.pvalue) and test["method"] == ref.method
    assert att["ablation_acc_mean"] == pytest.approx(0.55)
    assert att["ablation_delta"] == pytest.approx(0.55 - np.mean(accs))


def test_groups_by_backbone_and_fusion_each_against_its_own_none(tmp_path: Path) -> None:
    runs = [
        make_run(tmp_path / "r18-none-0", [0, 1, 2], "none", 0),
        make_run(tmp_path / "r18-none-1", [0, 1], "none", 1),
        make_run(tmp_path / "r18-late-0", [5], "late", 0),
        make_run(tmp_path / "r18-late-1", [6, 7], "late", 1),
        make_run(tmp_path / "r50-att-0", [9], "attention", 0, backbone="resnet50"),
    ]
    t = fusion_table(runs)
    labels = [g["label"] for g in t["groups"]]
    assert labels == ["resnet18 / 28 px / none", "resnet18 / 28 px / late", "resnet50 / 28 px / attention"]
    late = t["groups"][1]
    assert [m["seed"] for m in late["mcnemar"]] == [0, 1] and late["unpaired_seeds"] == []
    assert [m["none_run"] for m in late["mcnemar"]] == [str(runs[0]), str(runs[1])]
    r50 = t["groups"][2]
    assert r50["mcnemar"] is None  # no resnet50 none run to test against


def test_refusals(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", [], "attention", 0)
    twin = make_run(tmp_path / "twin", [1], "attention", 0)
    with pytest.raises(CompareError, match="seed 0"):
        fusion_table([a, twin])
    other = tmp_path / "other"
    make_run(other, [], "none", 0)
    np.savez(
        other / "test_predictions.npz",
        labels=np.roll(LABELS, 1), preds=LABELS, probs=np.eye(C, dtype=np.float32)[LABELS],
    )  # fmt: skip
    with pytest.raises(CompareError, match="different test labels"):
        fusion_table([a, other])
    with pytest.raises(CompareError, match="at least one run"):
        fusion_table([])


def test_cli_writes_markdown_and_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    none0 = make_run(tmp_path / "none0", list(range(20)), "none", 0)
    att0 = make_run(tmp_path / "att0", list(range(5)) + [40, 41], "attention", 0)
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    with pytest.raises(SystemExit) as exc:
        main(["table", str(none0), str(att0), "--markdown", str(md), "--json", str(js)])
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    assert md.read_text() + "\n" == out.out
    assert "| resnet18 / 28 px / none | 1 | 0.6667 +- 0.0000 |" in out.out
    assert "reference" in out.out and "seed 0: b 15 / c 2, p = 0.00235" in out.out
    assert json.loads(js.read_text())["groups"][1]["mcnemar"][0]["b"] == 15
    with pytest.raises(SystemExit) as exc:
        main(["table", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
