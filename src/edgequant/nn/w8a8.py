"""``W8A8Linear``: int8 weights × int8 activations with an integer matmul.

Weights are stored as the ``int`` format stores them (``w8a8`` = 8-bit symmetric codes, one
scale per output channel; codes are offset by ``2^(b-1)``), so every ``QuantLinear`` tool —
sizes, artifacts, dequantization — keeps working. The forward pass is what an int8 engine
does::

    x (M, K) float ──quantize──▶ x_q int8, s_x      per token (dynamic) or one calibrated
                                                    scale (static, ``act_scale``)
    acc = x_q · W_qᵀ            int32 (M, N)        torch._int_mm, or an exact fallback
    y   = acc · s_x · s_w + b   float               s_w per output channel

Activations use the symmetric range ``[-127, 127]``: ``s_x = max|x| / 127``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, SchemeError
from ..formats import QuantizedTensor, QuantScheme
from .quant_linear import QuantLinear, Record

QMAX = 127


def check_w8a8_scheme(scheme: QuantScheme) -> None:
    """Raise unless integer matmul can run ``scheme``: symmetric integer weights with one
    scale per channel or tensor, and 8-bit activations."""
    if scheme.act_bits != 8:
        raise SchemeError(f"scheme {scheme.name} quantizes no activations; W8A8 layers need "
                          f"an activation scheme such as w8a8 or w8a8-static")
    if scheme.format != "int" or not scheme.symmetric or scheme.granularity == "group":
        raise SchemeError(f"scheme {scheme.name}: W8A8 layers need symmetric integer weights "
                          f"with one scale per channel or per tensor (e.g. w8a8)")


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a ``(M, K)`` activation, one scale per row: (codes, (M, 1))."""
    amax = x.abs().amax(-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return quantize_with_scale(x, scale), scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale), -127, 127)``."""
    return torch.round(x.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)


def static_act_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale from a min-max observer (per-channel ``max|x|``): ``max / 127``."""
    m = absmax.float().amax()
    return (m / QMAX if m > 0 else torch.ones((), device=m.device)).reshape(1)


def int_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch._int_mm`` takes ``a (M, K) @ b (N, K)ᵀ`` on this device.

    On CPU it takes any shape (checked on torch 2.13); CUDA asks for M > 16 and K, N
    multiples of 8.
    """
    if not hasattr(torch, "_int_mm"):
        return False
    if a.device.type == "cpu":
        return True
    if a.device.type == "cuda":
        (m, k), n = a.shape, b.shape[0]
        return m > 16 and k % 8 == 0 and n % 8 == 0 and k >= 16
    return False


def int8_matmul(a: torch.Tensor, b: torch.Tensor, use_int_mm: bool | None = None
                ) -> torch.Tensor:
    """Exact ``a @ bᵀ`` of int8 ``a (M, K)`` and ``b (N, K)`` as int32 ``(M, N)``.

    ``torch._int_mm`` when it takes the shapes; otherwise float64 products, which are exact
    (each sum is below 127·128·K < 2^53).
    """
    if use_int_mm is None:
        use_int_mm = int_mm_ok(a, b)
    if use_int_mm:
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


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
        codes = self.quantized().unpacked_codes()
        return (codes.to(torch.int16) - (1 << (self.scheme.bits - 1))).to(torch.int8)

    def weight_scales(self) -> torch.Tensor:
        """Weight scales as a ``(1, out)`` (per channel) or ``(1, 1)`` (per tensor) row."""
        return self.quantized().params()["scales"].reshape(1, -1)

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes of ``x (M, K)`` and their scale: ``(M, 1)`` dynamic, ``(1,)`` static."""
        act_scale = cast(torch.Tensor | None, self.act_scale)
        if act_scale is None:
            return quantize_per_token(x)
        scale = act_scale.detach().float()
        return quantize_with_scale(x, scale), scale

    def forward(self, x: torch.Tensor, use_int_mm: bool | None = None) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        xq, sx = self.quantize_input(x2)
        acc = int8_matmul(xq, self.int_weight().to(x.device), use_int_mm)  # (M, N) int32
        y = acc.float() * (sx * self.weight_scales())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

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
