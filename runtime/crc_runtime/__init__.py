"""crc_runtime: run a crc-fusion bundle (docs/bundle.md) with numpy, onnxruntime, Pillow and click.

Never imports torch, crc_train or crc_export. The Python API is :class:`Predictor` (docs/python-api.md)::

    from crc_runtime import Predictor

    with Predictor("bundle") as predictor:
        result = predictor.predict("tile.png", "ct_slice.png")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Predictions", "Predictor"]

if TYPE_CHECKING:
    from .predictor import Predictions, Predictor


def __getattr__(name: str) -> Any:
    # Imported on first use, so ``crc-infer --help`` and the other modules do not pay for the API's
    # imports (numpy, Pillow, the backends) when they do not need them.
    if name in __all__:
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
