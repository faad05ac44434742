"""Binary and ternary weights: signs (and zeros) times one scale per channel or group.

| format  | values            | scale α                                   | code bits            |
| ------- | ----------------- | ----------------------------------------- | -------------------- |
| binary  | {−α, +α}          | mean|w| (XNOR-Net / BWN, the L2-optimal α)  | 1: ``1`` = +, x ≥ 0  |
| ternary | {−α, 0, +α}       | mean of |w| over |w| > Δ, Δ = 0.7·mean|w|  | 2: sign·magnitude    |

Ternary follows TWN (Li & Liu, 2016): weights with |w| > Δ become ±α, the rest 0. Its codes
are sign-magnitude, like FP4's sign bit::

    code  0b00 = 0      0b01 = +α      0b11 = −α      (0b10 is never written; decodes to 0)

α is rounded to nearest in ``scheme.scale_dtype`` (it is an average, not a range bound).
An all-zero group gives binary α = 0 (so its +α codes decode to exact zeros) and ternary
α = 1 with all codes 0. Ternary's threshold Δ is an encoder-only parameter (``delta`` in
``params``); only α is stored, and encoding with loaded parameters uses α/2.

Caveat, ragged groups: formats see the zero-padded grouped view (see ``base.group``), so
for a row whose length is not a multiple of the group size the last group's mean|w| counts
the padding — its α and Δ are scaled by (valid columns / group size). Channel and tensor
granularity, and widths that are multiples of the group size, are unaffected.
"""

from __future__ import annotations

import torch

from ..errors import SchemeError
from .base import TORCH_DTYPES, NumberFormat, register_format
from .scheme import QuantScheme

TWN_DELTA = 0.7


def round_scale_nearest(s: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Non-negative scales rounded to nearest in the storage dtype, back as fp32."""
    r = s.to(TORCH_DTYPES[dtype_name]).to(torch.float32)
    if not torch.isfinite(r).all():
        raise SchemeError(f"weights too large for {dtype_name} scales; use -fp32 scales")
    return r


@register_format
class Binary(NumberFormat):
    name = "binary"

    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        return {"scales": round_scale_nearest(xg.abs().mean(-1, keepdim=True), scheme.scale_dtype)}

    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        return (xg >= 0).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        return (2.0 * codes.to(torch.float32) - 1.0) * params["scales"]


@register_format
class Ternary(NumberFormat):
    name = "ternary"

    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        a = xg.abs()
        delta = TWN_DELTA * a.mean(-1, keepdim=True)  # (R, G, 1)
        big = a > delta
        n_big = big.sum(-1, keepdim=True)
        alpha = torch.where(big, a, torch.zeros_like(a)).sum(-1, keepdim=True) / n_big.clamp(min=1)
        alpha = torch.where(n_big > 0, alpha, torch.ones_like(alpha))
        return {"scales": round_scale_nearest(alpha, scheme.scale_dtype), "delta": delta}

    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        # without Δ (parameters loaded from disk) the nearest-value threshold α/2 is used
        delta = params["delta"] if "delta" in params else params["scales"] / 2
        nonzero = (xg.abs() > delta).to(torch.uint8)
        return nonzero | ((xg < 0).to(torch.uint8) & nonzero) << 1

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        c = codes.to(torch.int32)
        sign = 1.0 - 2.0 * (c >> 1).to(torch.float32)
        return sign * (c & 1).to(torch.float32) * params["scales"]

    def store(self, params: dict[str, torch.Tensor],
              scheme: QuantScheme) -> dict[str, torch.Tensor]:
        return super().store({"scales": params["scales"]}, scheme)

