"""``W8A8Linear``: int8 weights × int8 activations with an integer matmul.

Weights are stored as the ``int`` format stores them (``w8a8`` = 8-bit symmetric codes, one
scale per output channel), so every ``QuantLinear`` tool — sizes, artifacts, dequantization
— keeps working. What this layer adds is the activation side: a static scheme's calibrated
``act_scale``. The integer pipeline itself (quantize activations, int32 accumulate, rescale)
is a kernel's: :mod:`edgequant.kernels.w8a8` — exact float64 products on the reference
kernel, ``torch._int_mm`` on ``w8a8_int_mm`` (the same output bit for bit).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, SchemeError
from ..formats import QuantizedTensor, QuantScheme
from ..kernels.w8a8 import (
    QMAX,
    int8_matmul,
    int_mm_ok,
    quantize_input,
    quantize_per_token,
    quantize_with_scale,
    signed_codes,
    weight_scales,
    why_not_w8a8,
)
from .quant_linear import QuantLinear, Record

__all__ = ["QMAX", "W8A8Linear", "check_w8a8_scheme", "int8_matmul", "int_mm_ok",
           "quantize_per_token", "quantize_with_scale", "static_act_scale"]


def check_w8a8_scheme(scheme: QuantScheme) -> None:
    """Raise unless integer matmul can run ``scheme``: symmetric integer weights with one
    scale per channel or tensor, and 8-bit activations."""
    why = why_not_w8a8(scheme)
    if why is not None:
        raise SchemeError(why)


def static_act_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale from a min-max observer (per-channel ``max|x|``): ``max / 127``."""
    m = absmax.float().amax()
    return (m / QMAX if m > 0 else torch.ones((), device=m.device)).reshape(1)


class W8A8Linear(QuantLinear):
    """y ≈ x Wᵀ + b computed as an int8 × int8 → int32 matmul, then rescaled.

    Attributes:
        act_scale: static schemes only: the calibrated per-tensor activation scale, a
            ``(1,)`` parameter (so the pipeline rounds it to the artifact's keep dtype, and
            a saved model computes exactly what the one in memory did).
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 act_scale: torch.Tensor | None = None) -> None:
        check_w8a8_scheme(qt.scheme)
        super().__init__(qt, bias)
        param = None
        if not qt.scheme.act_dynamic:
            if act_scale is None:
                raise DataError(f"scheme {qt.scheme.name} has static activation ranges: a "
                                f"W8A8 layer needs its calibrated act_scale")
            param = nn.Parameter(act_scale.detach().float().reshape(1).clone(),
                                 requires_grad=False)
        self.register_parameter("act_scale", param)

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None,
                       stats: dict | None = None, config: object = None) -> W8A8Linear:
        """Static schemes take their activation range from the ``act_range`` statistic (an
        observer's choice), else from ``act_absmax`` (min-max, as SmoothQuant calibrates)."""
        act_scale = None
        if not qt.scheme.act_dynamic:
            stats = stats or {}
            absmax = stats.get("act_range", stats.get("act_absmax"))
            if absmax is None:
                raise DataError(f"scheme {qt.scheme.name} needs calibrated activation ranges: "
                                f"use method static or smoothquant with calibration data")
            act_scale = static_act_scale(absmax)
        return cls(qt, bias, act_scale)

    @classmethod
    def skeleton(cls, record: Record, where: str = "") -> W8A8Linear:
        base = QuantLinear.skeleton(record, where)
        static = not base.scheme.act_dynamic
        return cls(base.quantized(), base.bias, torch.empty(1) if static else None)

    # ------------------------------------------------------------------------- numbers
    def int_weight(self) -> torch.Tensor:
        """Signed weight codes ``(out, in)`` int8 (stored codes minus ``2^(b-1)``)."""
        return signed_codes(self.quantized())

    def weight_scales(self) -> torch.Tensor:
        """Weight scales as a ``(1, out)`` (per channel) or ``(1, 1)`` (per tensor) row."""
        return weight_scales(self.quantized())

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes of ``x (M, K)`` and their scale: ``(M, 1)`` dynamic, ``(1,)`` static."""
        return quantize_input(x, cast(torch.Tensor | None, self.act_scale))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same quantized math in floating point: dequantized activations × weights."""
        x2 = x.reshape(-1, self.in_features)
        xq, sx = self.quantize_input(x2)
        b = None if self.bias is None else self.bias.float()
        y = F.linear(xq.float() * sx, self.dequantized_weight(torch.float32), b)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", act=per-token" if self.act_scale is None
                                       else ", act=static")
