"""The streaming loop: a bounded decode pool, input order kept, same results whatever the worker count."""

from __future__ import annotations

import csv
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc_runtime import predict
from crc_runtime.cli import cli
from crc_runtime.pairs import discover_pairs
from crc_runtime.predictor import Predictor

PAIRS = 45


@pytest.fixture(scope="module")
def many(tiny, tmp_path_factory) -> Path:
    """45 pairs reusing the six example images under distinct ids, one of them corrupt."""
    folder = tmp_path_factory.mktemp("many")
    shutil.copytree(tiny.csv_dir / "img", folder / "img")
    (folder / "junk.png").write_bytes(b"not a png")
    with open(folder / "pairs.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "pathology", "radiology"])
        for i in range(PAIRS):
            path = "junk.png" if i == 17 else f"img/pathology/case-{i % 6}.png"
            writer.writerow([f"p{i:03d}", path, f"img/radiology/case-{(i * 5) % 6}.png"])
    return folder


@pytest.fixture(scope="module")
def predictor(tiny):
    with Predictor(tiny.bundle, "ort-cpu", threads=1) as p:
        yield p


def _run(many, predictor, batch_size, **kwargs):
    predictor.batch_size = batch_size
    return predict.run_inference(discover_pairs(many), predictor, **kwargs)


def test_same_predictions_in_input_order_for_any_worker_count(many, tiny, predictor):
    base = _run(many, predictor, batch_size=8, workers=0)
    ids = [p.id for p in base.predictions]
    assert ids == [f"p{i:03d}" for i in range(PAIRS) if i != 17]
    assert [s.item for s in base.skipped] == ["p017"] and "junk.png" in base.skipped[0].reason
    probs = np.stack([p.probs for p in base.predictions])
    for workers, batch_size in ((1, 8), (3, 8), (3, 1), (2, 64)):
        other = _run(many, predictor, batch_size=batch_size, workers=workers)
        assert [p.id for p in other.predictions] == ids, (workers, batch_size)
        np.testing.assert_allclose(
            np.stack([p.probs for p in other.predictions]), probs, rtol=1e-6, atol=1e-9
        )
        assert other.workers == workers and [s.item for s in other.skipped] == ["p017"]
    calls = [base.warmup_pairs, *base.batch_pairs]  # the first batch is the warm-up, its predictions kept
    assert calls == [8] * (len(calls) - 1) + [PAIRS - 1 - 8 * (len(calls) - 1)]
    assert base.processed == PAIRS - 1


def test_decoded_pairs_in_flight_stay_bounded(many, tiny, predictor, monkeypatch):
    """Never more than (prefetch_batches + 1) x batch_size pairs decoded or decoding and not yet predicted."""
    lock = threading.Lock()
    started, done, worst = [0], [0], [0]
    real = predict._decode

    def counting(*args):
        with lock:
            started[0] += 1
            worst[0] = max(worst[0], started[0] - done[0])
        return real(*args)

    def on_batch(preds):
        with lock:
            done[0] += len(preds)

    monkeypatch.setattr(predict, "_decode", counting)
    batch_size, prefetch = 4, 2
    result = _run(
        many, predictor, batch_size=batch_size, workers=3, prefetch_batches=prefetch,
        on_batch=on_batch, keep_predictions=False,
    )  # fmt: skip
    assert started[0] == PAIRS  # every pair decoded exactly once (the junk one fails in decode)
    assert result.processed == PAIRS - 1 and result.predictions == []  # nothing kept: memory stays flat
    # The junk pair is decoded but never predicted, so it may count against the bound once.
    assert batch_size <= worst[0] <= (prefetch + 1) * batch_size + 1


def test_resumed_ids_are_not_decoded(many, tiny, predictor):
    skip = {f"p{i:03d}" for i in range(10)}
    result = _run(many, predictor, batch_size=8, workers=2, skip_ids=skip)
    assert result.resumed == 10 and result.processed == PAIRS - 11
    assert result.predictions[0].id == "p010"


def test_cli_output_does_not_depend_on_workers(many, tiny, tmp_path):
    outputs = []
    for workers in ("0", "3"):
        out = tmp_path / f"w{workers}.csv"
        result = CliRunner().invoke(
            cli,
            [str(many), "--bundle", str(tiny.bundle), "--batch-size", "8", "--workers", workers,
             "--output", str(out), "--threads", "1"],
        )  # fmt: skip
        assert result.exit_code == 3, result.output  # 3: predictions written, one pair skipped
        assert f"({workers} decode workers)" in result.output
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == PAIRS  # header + 44 rows


def test_every_batch_runs_once_warm_up_included(many, tiny, predictor, monkeypatch):
    """The warm-up is the first real batch, not an extra call: 44 good pairs at batch 8 = 6 model calls."""
    sizes = []
    infer = predictor.backend.infer

    def counting(inputs):
        sizes.append(len(inputs["pathology"]))
        return infer(inputs)

    monkeypatch.setattr(predictor.backend, "infer", counting)
    result = _run(many, predictor, batch_size=8, workers=0)
    assert sizes == [8, 8, 8, 8, 8, 4]
    assert result.warmup_pairs == 8 and result.batch_pairs == [8, 8, 8, 8, 4]
    assert len(result.predictions) == 44
    unwarmed = _run(many, predictor, batch_size=8, workers=0, warmup=False)
    assert unwarmed.warmup_pairs == 0 and unwarmed.batch_pairs == [8, 8, 8, 8, 8, 4]
