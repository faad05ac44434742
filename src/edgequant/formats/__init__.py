"""Numbers: schemes, formats, packing and quantized tensors (no model knowledge).

Importing this package registers every format.
"""

from . import codebook, floating, integer, sign  # noqa: F401  (registers formats)
from .base import NumberFormat, get_format, register_format
from .scheme import QuantScheme
from .tensor import QuantizedTensor, quantize_tensor

__all__ = ["NumberFormat", "QuantScheme", "QuantizedTensor", "get_format", "quantize_tensor",
           "register_format"]
