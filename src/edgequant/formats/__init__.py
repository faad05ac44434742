"""Numbers: schemes, formats, packing and quantized tensors (no model knowledge).

``QuantScheme`` (:mod:`.scheme`) needs no torch, so reading a scheme from a manifest is cheap;
the rest is imported on first use, and :func:`get_format` registers every format.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .scheme import QuantScheme

if TYPE_CHECKING:
    from .base import NumberFormat, get_format, register_format
    from .tensor import QuantizedTensor, quantize_tensor

__all__ = ["NumberFormat", "QuantScheme", "QuantizedTensor", "get_format", "quantize_tensor",
           "register_format"]

_LAZY = {"NumberFormat": ".base", "get_format": ".base", "register_format": ".base",
         "QuantizedTensor": ".tensor", "quantize_tensor": ".tensor"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
