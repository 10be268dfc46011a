"""`crc-train compare` on hand-made run dirs: McNemar per seed pair, mean +- sd, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from crc_train.cli import main
from crc_train.compare import CompareError, compare_runs
from crc_train.metrics import mcnemar

N, C = 60, 3
LABELS = np.arange(N) % C


def make_run(path: Path, correct: np.ndarray, labels: np.ndarray = LABELS, sha: str = "abc") -> Path:
    """A run dir holding only what compare reads: test_predictions.npz and metrics.json."""
    path.mkdir(parents=True)
    preds = np.where(correct, labels, (labels + 1) % C)
    probs = np.eye(C, dtype=np.float32)[preds]
    np.savez(
        path / "test_predictions.npz",
        labels=labels, preds=preds, probs=probs, pair_index=np.arange(len(labels)), test_sha256=np.array(sha),
    )  # fmt: skip
    (path / "metrics.json").write_text(json.dumps({"classes": ["a", "b", "c"], "test_sha256": sha}))
    return path


def correct_mask(wrong: list[int]) -> np.ndarray:
    ok = np.ones(N, dtype=bool)
    ok[wrong] = False
    return ok


def run_cli(*args: str, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_single_pair_table_and_accuracies(tmp_path: Path) -> None:
    ok_a = correct_mask([0, 1])  # A wrong on 2
    ok_b = correct_mask([0, *range(10, 18)])  # B wrong on 9; both wrong on pair 0
    a, b = make_run(tmp_path / "a", ok_a), make_run(tmp_path / "b", ok_b)
    res = compare_runs([a], [b])
    (t,) = res["tests"]
    assert t["table"] == [[50, 8], [1, 1]]
    assert t["acc_a"] == pytest.approx(58 / 60) and t["acc_b"] == pytest.approx(51 / 60)
    ref = mcnemar(ok_a, ok_b)
    assert t["method"] == "exact binomial" and t["pvalue"] == pytest.approx(ref.pvalue)
    assert res["a"]["acc_sd"] == 0.0


def test_several_seeds_per_side(tmp_path: Path) -> None:
    a = [make_run(tmp_path / f"a{i}", correct_mask(list(range(i)))) for i in (1, 2, 3)]
    b = [make_run(tmp_path / f"b{i}", correct_mask(list(range(10 + i)))) for i in (1, 2, 3)]
    res = compare_runs(a, b)
    assert len(res["tests"]) == 3 and "seed pair" in res["pairing"]
    assert [t["run_b"] for t in res["tests"]] == ["b1", "b2", "b3"]
    accs = [(N - i) / N for i in (1, 2, 3)]
    assert res["a"]["acc_mean"] == pytest.approx(np.mean(accs))
    assert res["a"]["acc_sd"] == pytest.approx(np.std(accs, ddof=1))
    uneven = compare_runs(a, b[:1])
    assert len(uneven["tests"]) == 1 and "first pair only" in uneven["pairing"]


def test_refuses_runs_with_other_labels_or_pairs(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", correct_mask([]))
    other_labels = make_run(tmp_path / "l", correct_mask([]), labels=np.roll(LABELS, 1))
    shorter = make_run(tmp_path / "s", np.ones(N - 3, bool), labels=LABELS[:-3])
    other_images = make_run(tmp_path / "i", correct_mask([]), sha="def")
    with pytest.raises(CompareError, match="different test labels"):
        compare_runs([a], [other_labels])
    with pytest.raises(CompareError, match="different test sets"):
        compare_runs([a], [shorter])
    with pytest.raises(CompareError, match="different images"):
        compare_runs([a], [other_images])


def test_cli_prints_table_test_and_explanation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = make_run(tmp_path / "a", correct_mask(list(range(30))))
    b = make_run(tmp_path / "b", correct_mask(list(range(30, 35))))
    md = tmp_path / "cmp.md"
    code, out, err = run_cli("compare", str(a), "--vs", str(b), "--markdown", str(md), capsys=capsys)
    assert code == 0, err
    # A wrong on pairs 0-29, B wrong on 30-34: b = 5 (A right, B wrong), c = 30
    assert "| A right | 25 | 5 |" in out and "| A wrong | 30 | 0 |" in out
    assert "accuracy A 0.5000, accuracy B 0.9167" in out
    assert "McNemar (chi-square (continuity corrected)): statistic 16.4571" in out  # 24^2 / 35
    assert "z = 4.70" in out and "McNemar" in out and "two-proportion" in out
    assert md.read_text() + "\n" == out


def test_cli_refuses_mismatch_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = make_run(tmp_path / "a", correct_mask([]))
    b = make_run(tmp_path / "b", correct_mask([]), labels=np.roll(LABELS, 1))
    code, out, err = run_cli("compare", str(a), str(b), capsys=capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    code, _, err = run_cli("compare", str(a), capsys=capsys)
    assert code == 1 and err.startswith("error: ") and "--vs" in err
    code, _, err = run_cli("compare", str(a), str(tmp_path / "missing"), capsys=capsys)
    assert code == 1 and "not found" in err and err.count("\n") == 1
    code, _, err = run_cli("compare", str(a), "--vz", str(b), capsys=capsys)
    assert code == 1 and "no such option: --vz" in err
