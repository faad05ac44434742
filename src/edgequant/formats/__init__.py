"""Numbers: schemes, formats, packing and quantized tensors (no model knowledge).

``QuantScheme`` (:mod:`.scheme`) needs no torch, so reading a scheme from a manifest is cheap;
the rest is imported on first use, and :func:`get_format` registers every format.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes
from .scheme import QuantScheme

if TYPE_CHECKING:
    from .base import NumberFormat, get_format, register_format
    from .tensor import QuantizedTensor, quantize_tensor

__all__ = ["NumberFormat", "QuantScheme", "QuantizedTensor", "get_format", "quantize_tensor",
           "register_format"]

__getattr__ = lazy_attributes(__name__, {
    "NumberFormat": ".base", "get_format": ".base", "register_format": ".base",
    "QuantizedTensor": ".tensor", "quantize_tensor": ".tensor"})
