"""The one backend interface (Polygraphy-like runner) and the input check every backend shares."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import BackendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: numpy dtype name and shape; a str or None dimension is free (e.g. ``"batch"``)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


@runtime_checkable
class Backend(Protocol):
    """What crc-infer needs from an inference engine.

    Attributes:
        name: Short name used in reports, e.g. ``ort-cpu``.
        precision: ``fp32`` or ``fp16``.
        input_specs: The model's inputs as the engine sees them.

    Optional attributes the runtime reads with ``getattr`` when present: ``device`` (``cpu`` / ``cuda``),
    ``version`` (library and version, for reports), ``last_timings`` (milliseconds of the last
    :meth:`infer` per stage: ``h2d_ms``, ``compute_ms``, ``d2h_ms``), ``timing_method`` (how the stages
    were timed), ``max_batch`` (largest batch the engine takes in one call).
    """

    name: str
    precision: str
    input_specs: list[TensorSpec]

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; returns every output by name."""
        ...

    def close(self) -> None:
        """Release the engine; the backend cannot be used afterwards."""
        ...


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
