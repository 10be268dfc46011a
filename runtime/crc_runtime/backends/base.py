"""The one backend contract (a Polygraphy-like runner) and the input check every backend shares.

A backend is made in two steps: the constructor only records what to run and how (no file is read, no
device touched); :meth:`Backend.activate` loads the model and fills the metadata that needs it; then
:meth:`Backend.infer` runs batches and :meth:`Backend.deactivate` frees everything. ``with backend:``
does activate / deactivate. The base class checks each batch against the model's inputs before a backend
sees it, and checks after activation that the backend set every field of :data:`METADATA`, so callers
read them directly and never probe with ``getattr``.
"""

from __future__ import annotations

import abc
import logging
import os
import platform
from dataclasses import dataclass

import numpy as np

from ..errors import BackendError

log = logging.getLogger(__name__)

#: What every backend says about itself once active (reports and the bench read these, nothing else):
#: ``name`` (``ort-cpu`` / ``ort-cuda`` / ``trt``), ``device`` (``cpu`` or ``cuda:N``), ``precision``
#: (``fp32``, ``tf32``, ``fp16`` or ``int8``), ``version`` (library and version), ``max_batch``
#: (largest batch one call takes, None when unbounded), ``timing_method`` (how ``last_timings`` stages are
#: timed) and ``device_info`` (a dict with at least ``name``: the CPU or GPU that runs the model).
METADATA = ("name", "device", "precision", "version", "max_batch", "timing_method", "device_info")
PRECISIONS = ("fp32", "tf32", "fp16", "int8")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: numpy dtype name and shape; a str or None dimension is free (e.g. ``"batch"``)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


def cpu_info() -> dict:
    """``device_info`` of the CPU: processor name and logical core count."""
    return {"name": platform.processor() or platform.machine(), "cores": os.cpu_count()}


class Backend(abc.ABC):
    """What crc-infer needs from an inference engine.

    Subclasses set the :data:`METADATA` fields (in ``__init__``, or in :meth:`_activate` for what needs
    the loaded model) plus ``input_specs`` / ``output_specs``, and implement :meth:`_activate`,
    :meth:`_infer` and :meth:`_deactivate`. They never fall back to another device or backend: that
    policy lives in :func:`crc_runtime.backends.open_backend` alone.

    Attributes:
        last_timings: Milliseconds of the last :meth:`infer` per stage (``h2d_ms``, ``compute_ms``,
            ``d2h_ms``); the stages a backend does not time are absent.
    """

    name: str
    device: str
    precision: str
    version: str
    max_batch: int | None
    timing_method: str
    device_info: dict
    input_specs: list[TensorSpec]
    output_specs: list[TensorSpec]

    def __init__(self) -> None:
        self.last_timings: dict[str, float] = {}
        self.active = False

    def activate(self) -> Backend:
        """Load the model; returns the backend, ready for :meth:`infer`.

        Raises:
            BackendError: The model cannot run here; one line saying why and what to do.
        """
        if self.active:
            return self
        self._activate()
        self.active = True
        try:
            self._check_metadata()
        except BaseException:
            self.deactivate()
            raise
        return self

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch after checking names, dtypes and shapes; returns every output by name.

        Raises:
            BackendError: The backend is not active, or the inputs do not fit the model (one line).
        """
        if not self.active:
            raise BackendError(f"{self.name}: infer() before activate(); use 'with backend:' or activate()")
        check_inputs(self.input_specs, inputs)
        return self._infer(inputs)

    def deactivate(self) -> None:
        """Free the model and every buffer; :meth:`activate` may load it again."""
        if self.active:
            self.active = False
            self._deactivate()

    def __enter__(self) -> Backend:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _check_metadata(self) -> None:
        missing = [key for key in (*METADATA, "input_specs", "output_specs") if not hasattr(self, key)]
        if missing:
            raise TypeError(f"{type(self).__name__} did not set {', '.join(missing)} (Backend contract)")
        if self.precision not in PRECISIONS:
            raise TypeError(f"{type(self).__name__}.precision {self.precision!r} is not one of {PRECISIONS}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise TypeError(f"{type(self).__name__}.max_batch {self.max_batch!r} is not a positive int")
        if not isinstance(self.device_info, dict) or "name" not in self.device_info:
            raise TypeError(f"{type(self).__name__}.device_info has no 'name'")

    @abc.abstractmethod
    def _activate(self) -> None:
        """Load the model and set the metadata that needs it."""

    @abc.abstractmethod
    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch whose inputs :func:`check_inputs` accepted; set :attr:`last_timings`."""

    @abc.abstractmethod
    def _deactivate(self) -> None:
        """Free what :meth:`_activate` made."""


def check_inputs(specs: list[TensorSpec], inputs: dict[str, np.ndarray]) -> None:
    """Check names, dtypes, ranks and fixed dimensions before anything runs; batch sizes must agree.

    Raises:
        BackendError: One line listing what the model expects and what was given.
    """
    expected = {s.name for s in specs}
    given = set(inputs)
    if given != expected:
        raise BackendError(
            f"model inputs are {sorted(expected)}, given {sorted(given)}"
            f" (missing {sorted(expected - given)}, unexpected {sorted(given - expected)})"
        )
    batch: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        if not isinstance(array, np.ndarray):
            raise BackendError(f"input {spec.name}: expected a numpy array, given {type(array).__name__}")
        if array.dtype != np.dtype(spec.dtype):
            raise BackendError(f"input {spec.name}: expected dtype {spec.dtype}, given {array.dtype}")
        if array.ndim != len(spec.shape):
            raise BackendError(
                f"input {spec.name}: expected {spec.describe()}, given shape {list(array.shape)}"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise BackendError(
                    f"input {spec.name}: expected {spec.describe()}, given shape {list(array.shape)} "
                    f"(axis {axis} is {got}, must be {want})"
                )
        if batch is None:
            batch = array.shape[0] if array.ndim else None
        elif array.shape[0] != batch:
            raise BackendError(
                f"inputs disagree on batch size: {spec.name} has {array.shape[0]}, others {batch}"
            )
