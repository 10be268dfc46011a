"""Nothing lost: predictions go to a .partial file, a killed crc-infer resumes to the same bytes."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from click.testing import CliRunner
from crc_runtime.cli import cli
from crc_runtime.errors import UserError
from crc_runtime.predictions import PredictionWriter

COLUMNS = ["id", "predicted", "prob_a", "label", "correct"]
KEY = {"manifest_sha256": "abc", "artifact": "model.onnx"}


def _rows(ids):
    return [[i, "a", "0.500000", "", ""] for i in ids]


def _read(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_writer_only_the_partial_exists_until_finalize(tmp_path):
    out = tmp_path / "p.csv"
    writer = PredictionWriter(out, COLUMNS, resume=False, run_key=KEY)
    writer.write_rows(_rows(["x", "y"]))
    assert not out.exists() and _read(writer.partial) == [COLUMNS, *_rows(["x", "y"])]
    writer.finalize(order=["x", "y"])
    assert _read(out) == [COLUMNS, *_rows(["x", "y"])]
    assert not writer.partial.exists() and not writer.key_path.exists()


def test_writer_resume_drops_a_torn_row_and_skips_done_ids(tmp_path):
    out = tmp_path / "p.csv"
    writer = PredictionWriter(out, COLUMNS, run_key=KEY)
    writer.write_rows(_rows(["a", "b"]))
    writer._fh.close()  # the process "dies" here, mid-way through writing row c
    with open(writer.partial, "a") as fh:
        fh.write("c,a,0.5")
    resumed = PredictionWriter(out, COLUMNS, resume=True, run_key=KEY)
    assert resumed.done_ids == {"a", "b"} and resumed.dropped_torn == 0
    assert writer.partial.read_text().endswith("0.500000,,\n")
    resumed.write_rows(_rows(["c"]))
    resumed.finalize(order=["a", "b", "c"])
    assert _read(out) == [COLUMNS, *_rows(["a", "b", "c"])]


def test_writer_resume_drops_a_record_cut_inside_quotes(tmp_path):
    out = tmp_path / "p.csv"
    writer = PredictionWriter(out, COLUMNS, run_key=KEY)
    writer.write_rows(_rows(["a"]))
    writer._fh.close()
    with open(writer.partial, "a") as fh:
        fh.write('"b with\n')  # an id with a newline, cut right after it
    resumed = PredictionWriter(out, COLUMNS, resume=True, run_key=KEY)
    assert resumed.done_ids == {"a"} and resumed.dropped_torn == 1
    resumed.discard()


def test_writer_finalize_puts_rows_in_pair_order_and_drops_stale_ids(tmp_path):
    out = tmp_path / "p.csv"
    writer = PredictionWriter(out, COLUMNS, run_key=KEY)
    writer.write_rows(_rows(["c", "gone", "a"]))
    writer.finalize(order=["a", "b", "c"])
    assert _read(out) == [COLUMNS, *_rows(["a", "c"])]


def test_writer_refuses_to_mix_runs(tmp_path):
    out = tmp_path / "p.csv"
    PredictionWriter(out, COLUMNS, run_key=KEY).write_rows(_rows(["a"]))
    with pytest.raises(UserError, match="another bundle, artifact or class list"):
        PredictionWriter(out, COLUMNS, resume=True, run_key={**KEY, "artifact": "model.fp16.onnx"})
    with pytest.raises(UserError, match="another bundle"):
        PredictionWriter(out, [*COLUMNS[:-1], "other"], resume=True, run_key=KEY)
    fresh = PredictionWriter(out, COLUMNS, resume=False, run_key=KEY)  # without --resume: start over
    assert fresh.done_ids == set() and _read(fresh.partial) == [COLUMNS]
    fresh.discard()
    assert not fresh.partial.exists()


def test_writer_refuses_a_symlinked_partial(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    out = tmp_path / "p.csv"
    (tmp_path / "p.csv.partial").symlink_to(target)
    with pytest.raises(UserError, match="symlink"):
        PredictionWriter(out, COLUMNS, resume=True, run_key=KEY)
    assert target.read_text() == "precious\n"


def test_ctrl_c_keeps_the_rows_and_says_how_to_resume(tiny, tmp_path, many_pairs, start_run, ctrl_c):
    folder = tmp_path / "in"
    folder.mkdir()
    many_pairs(folder, 1000)
    out = tmp_path / "p.csv"
    proc, args = start_run(folder, out)
    stderr = ctrl_c(proc)
    assert proc.returncode == 130, stderr
    assert stderr.startswith("interrupted: ") and stderr.count("\n") == 1 and "--resume" in stderr, stderr
    assert not out.exists() and len(_read(out.with_name("p.csv.partial"))) > 1
    resumed = CliRunner().invoke(cli, [*args, "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0 and len(_read(out)) == 1001, resumed.output


def test_existing_output_symlink_is_replaced_not_followed(tiny, csv_copy, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    out = csv_copy / "predictions.csv"
    out.symlink_to(precious)
    result = CliRunner().invoke(cli, [str(csv_copy), "--bundle", str(tiny.bundle)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert precious.read_text() == "keep me\n" and not out.is_symlink() and len(_read(out)) == 7


def test_killed_run_resumes_to_the_same_bytes(tiny, tmp_path, many_pairs, start_run, sigkill):
    folder = tmp_path / "in"
    folder.mkdir()
    many_pairs(folder, 1000)
    killed_out = tmp_path / "killed.csv"
    partial = tmp_path / "killed.csv.partial"
    proc, args = start_run(folder, killed_out)  # some rows, surely not all 1000
    sigkill(proc)
    assert not killed_out.exists(), "a killed run must not leave a file under the final name"
    done_before = len(_read(partial)) - 1
    assert 0 < done_before < 1000

    runner = CliRunner()
    resumed = runner.invoke(cli, [*args, "--resume"], catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert f"already in {partial.name} (resumed)" in resumed.output
    assert f"pairs: {1000 - done_before} processed, {done_before} already" in resumed.output
    assert "accuracy: " in resumed.output and "on 1000 labelled pairs" in resumed.output
    assert not partial.exists()

    clean_out = tmp_path / "clean.csv"
    clean = runner.invoke(cli, [*args[:-1], str(clean_out)], catch_exceptions=False)
    assert clean.exit_code == 0, clean.output
    assert killed_out.read_bytes() == clean_out.read_bytes()
    rows = _read(clean_out)
    assert len(rows) == 1001 and [r[0] for r in rows[1:4]] == ["p00000", "p00919", "p00838"]


def test_resume_with_nothing_to_resume_is_a_normal_run(tiny, csv_copy, tmp_path):
    out = tmp_path / "p.csv"
    args = [str(csv_copy), "--bundle", str(tiny.bundle), "--device", "cpu", "--output", str(out)]
    result = CliRunner().invoke(cli, [*args, "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "pairs: 6 processed, 0 already" in result.output and len(_read(out)) == 7
