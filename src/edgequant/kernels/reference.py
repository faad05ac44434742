"""The reference kernel: dequantize the weight, then a dense matmul. It runs every scheme on
every device, exactly as the format defines the numbers, and is what every other kernel is
tested against.

Its "layout" is the artifact's own tensors (no copy), so a layer on it can always be saved.
The price is a full dequantization per call — for one decode token ~20× the matmul itself —
unless the layer's :attr:`~edgequant.kernels.registry.Packed.cache` holds the dequantized
weights (``dequantized_weights_cached``: for accuracy metrics, never for speed or memory).
Schemes that quantize activations (``w8a8``) run the integer pipeline of
:mod:`edgequant.kernels.w8a8` with exact float64 products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import QuantizedTensor, QuantScheme
from ..formats.tensor import CODES, G_IDX
from .registry import REFERENCE, Kernel, LayerSpec, Packed, register_kernel
from .w8a8 import signed_codes, static_scale, w8a8_matmul, weight_scales, why_not_w8a8


def artifact_tensor(packed: Packed) -> QuantizedTensor:
    """The ``QuantizedTensor`` whose tensors ``packed`` holds (the reference's layout)."""
    t = packed.tensors
    stored = {k: v for k, v in t.items() if k not in (CODES, G_IDX)}
    return QuantizedTensor(packed.scheme, packed.shape, t[CODES], stored, t.get(G_IDX))


@register_kernel
class ReferenceKernel(Kernel):
    name = REFERENCE
    priority = 0
    summary = "dequantize every weight on every call, then a dense matmul (exact)"
    exact = True

    def supports(self, spec: LayerSpec) -> str | None:
        if spec.scheme.act_bits is not None:
            return why_not_w8a8(spec.scheme)
        return None

    def claims(self, scheme: QuantScheme) -> bool:
        return True

    def prepack(self, qt: QuantizedTensor, spec: LayerSpec) -> Packed:
        return Packed(qt.scheme, qt.shape, qt.tensors())

    def matmul(self, x: torch.Tensor, packed: Packed,
               bias: torch.Tensor | None) -> torch.Tensor:
        if packed.scheme.act_bits is not None:
            qt = artifact_tensor(packed)
            return w8a8_matmul(x, signed_codes(qt), weight_scales(qt), static_scale(packed),
                               bias, use_int_mm=False)
        cache = packed.cache
        w = None if cache is None else cache.get(x.dtype)
        if w is None:
            w = self.dequantize(packed, x.dtype)
            if cache is not None:
                cache[x.dtype] = w
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    def dequantize(self, packed: Packed, dtype: torch.dtype) -> torch.Tensor:
        return artifact_tensor(packed).dequantize(dtype)

    def unpack(self, packed: Packed) -> QuantizedTensor:
        return artifact_tensor(packed)
