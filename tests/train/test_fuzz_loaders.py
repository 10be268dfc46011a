"""Bounded fuzzing of crc-train's loaders: random configs, npz files and checkpoint / last.pt dicts.

Whatever goes in, a loader either accepts it (and then it holds what the schema promises) or raises our
one-line user error; any other exception is a bug. Fixed example budgets and ``derandomize=True``: the
same examples every run, so CI time is bounded (the house style of tests/runtime/test_rt_fuzz.py).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from crc_train.config import RunConfig, load_run_config
from crc_train.data import read_npz_split
from crc_train.errors import ConfigError, DataError, UserError
from crc_train.model import build_model
from crc_train.optim import build_optimizer
from crc_train.rundir import check_checkpoint, check_last, model_from_checkpoint
from crc_train.training import DistContext, _restore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FEW = settings(FUZZ, max_examples=40)  # examples that rebuild a model


@pytest.fixture(scope="module")
def workdir():
    root = Path(tempfile.mkdtemp(prefix="crc-train-fuzz-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _one_line(exc: BaseException) -> None:
    assert isinstance(exc, UserError), repr(exc)
    assert "\n" not in str(exc) and str(exc).strip(), repr(exc)


# ---------------------------------------------------------------- values of every kind

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 28, 64, 2**32, 2**31 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["resnet18", "attention", "none", "ce", "plateau", "cpu", "synthetic", ""]),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_TENSORS = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 4), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
)
_VALUES = st.one_of(_JSON, _TENSORS, st.just(torch.tensor(float("nan"))), st.tuples(_SCALARS, _SCALARS))


# ---------------------------------------------------------------- config.json


def _field_names() -> dict[str, list[str]]:
    d = RunConfig().to_dict()
    return {section: sorted(fields) for section, fields in d.items()}


@FUZZ
@given(
    sections=st.dictionaries(
        st.sampled_from(["model", "data", "train", "run_id", "extra"]), _JSON, max_size=4
    ),
    data=st.data(),
)
def test_config_json_random_fields(workdir, sections, data):
    names = _field_names()
    config: dict[str, Any] = {}
    for section, value in sections.items():
        if section in names and data.draw(st.booleans()):  # a section of real field names
            keys = data.draw(st.lists(st.sampled_from([*names[section], "unknown"]), max_size=6))
            value = {k: data.draw(_JSON) for k in keys}
        config[section] = value
    path = workdir / "config.json"
    path.write_text(json.dumps(config))  # NaN / Infinity as JSON's extension, which json.loads reads
    _load_config_checked(path)


@FUZZ
@given(content=st.binary(max_size=200))
def test_config_json_arbitrary_bytes(workdir, content):
    path = workdir / "config.json"
    path.write_bytes(content)
    _load_config_checked(path)


def _load_config_checked(path: Path) -> None:
    try:
        cfg, _ = load_run_config(path)
    except ConfigError as exc:
        _one_line(exc)
        assert str(exc).startswith(str(path)), str(exc)
        return
    for section in (cfg.model, cfg.data, cfg.train):  # accepted: typed and in range
        for value in vars(section).values():
            assert not isinstance(value, float) or math.isfinite(value)
    assert cfg.train.lr > 0 and cfg.train.epochs >= 1 and 0 <= cfg.train.seed < 2**32


# ---------------------------------------------------------------- npz files

_DTYPES = [np.uint8, np.uint16, np.int8, np.int64, np.float32, np.float64, np.bool_, np.complex64, object]


@st.composite
def _array(draw, images: bool):
    dtype = draw(st.sampled_from(_DTYPES))
    n = draw(st.integers(0, 4))
    if images:
        shape = draw(
            st.sampled_from(
                [(n, 28, 28, 3), (n, 28, 28), (n, 28, 28, 1), (n, 32, 32, 3), (n, 28, 3), (n,), ()]
            )
        )
    else:
        shape = draw(st.sampled_from([(n,), (n, 1), (n, 2), (), (n + 1, 1)]))
    if dtype is object:
        return np.array([draw(_SCALARS) for _ in range(max(n, 1))], dtype=object)
    values = draw(st.sampled_from([0, 1, 8, 9, 10, 11, 255, -1]))
    return np.full(shape, values).astype(dtype) if dtype is not np.bool_ else np.zeros(shape, bool)


@FUZZ
@given(
    flag=st.sampled_from(["pathmnist", "organamnist"]),
    keys=st.dictionaries(
        st.sampled_from(["train_images", "train_labels", "val_images", "other"]),
        st.sampled_from(["images", "labels"]),
        max_size=4,
    ),
    data=st.data(),
)
def test_npz_random_arrays(workdir, flag, keys, data):
    arrays = {key: data.draw(_array(kind == "images")) for key, kind in keys.items()}
    path = workdir / "fuzz.npz"
    np.savez(path, **arrays)
    _read_checked(path, flag)


@FUZZ
@given(content=st.binary(max_size=300), prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x93NUMPY"]))
def test_npz_arbitrary_bytes(workdir, content, prefix):
    path = workdir / "bytes.npz"
    path.write_bytes(prefix + content)
    _read_checked(path, "pathmnist")


def _read_checked(path: Path, flag: str) -> None:
    try:
        images, labels = read_npz_split(path, flag, "train", 28)
    except DataError as exc:
        _one_line(exc)
        assert str(exc).startswith(f"{path}: "), str(exc)
        return
    channels = 3 if flag == "pathmnist" else 1
    assert images.dtype == np.uint8 and images.shape[1:3] == (28, 28)
    assert images.shape[3:] in (((3,),) if channels == 3 else ((), (1,)))
    assert labels.dtype.kind in "iu" and labels.reshape(-1).shape == (images.shape[0],)
    assert labels.size == 0 or (labels.min() >= 0 and labels.max() < (9 if channels == 3 else 11))


# ---------------------------------------------------------------- checkpoint and last.pt dicts


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (key, ...) path into nested dicts and lists."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _mutate(base: dict, data) -> dict:
    """A copy of ``base`` with 1-3 random edits: a value replaced, a key removed, an unknown key added."""
    d = copy.deepcopy({k: v for k, v in base.items() if k not in ("state_dict",)})
    d["state_dict"] = dict(base["state_dict"])  # tensors are replaced, never changed in place
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(d)
        path = data.draw(st.sampled_from(paths))
        parent = d
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = data.draw(_VALUES)
        elif action == "remove" and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text(max_size=5))] = data.draw(_VALUES)
        else:
            parent.append(data.draw(_VALUES))
    return d


@pytest.fixture(scope="module")
def checkpoint(small_run: Path) -> dict:
    return _QuietDict(torch.load(small_run / "checkpoint.pt", weights_only=True))


class _QuietDict(dict):
    def __repr__(self) -> str:
        return "<checkpoint dict>"


@FEW
@given(data=st.data())
def test_checkpoint_random_fields(checkpoint, data):
    ckpt = _mutate(checkpoint, data)
    try:
        check_checkpoint(ckpt, "fuzz/checkpoint.pt")
        model_from_checkpoint(ckpt, "fuzz/checkpoint.pt")
    except UserError as exc:
        _one_line(exc)


@pytest.fixture(scope="module")
def last_state(small_run: Path) -> dict:
    return _QuietDict(torch.load(small_run / "last.pt", weights_only=True))


@pytest.fixture(scope="module")
def resume_target(last_state: dict):
    """The objects ``_restore`` loads a last.pt into, built once from the run's own config."""
    cfg = RunConfig.from_dict(last_state["config"])
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    return _Quiet((model, optimizer, SimpleNamespace(generator=torch.Generator())))


class _Quiet(tuple):
    """A fixture value hypothesis prints in one word when an example fails (not a 2 MB model repr)."""

    def __repr__(self) -> str:
        return "<model, optimizer, loader>"


@FEW
@given(data=st.data())
def test_last_pt_random_fields(last_state, resume_target, data):
    state = _mutate(last_state, data)
    model, optimizer, loader = resume_target
    try:
        check_last(state, "fuzz/last.pt")
        if len(state["rng"]) != 1:
            return  # train() refuses another process count before _restore (tests/train/test_saved_files)
        _restore(state, model, None, optimizer, None, None, loader, DistContext(), Path("fuzz/last.pt"))
    except UserError as exc:
        _one_line(exc)
