"""Scaled low-precision floats: float8 (e4m3 / e5m2) and OCP FP4 (e2m1).

Every group stores one scale ``s = max|x| / FMAX`` (rounded *up* to ``scheme.scale_dtype``,
see ``round_scale_up``), and each weight is the float nearest to ``x / s``:

| format   | codes                               | FMAX  | rounding                       |
| -------- | ----------------------------------- | ----- | ------------------------------ |
| fp8_e4m3 | ``torch.float8_e4m3fn`` bits, uint8 | 448   | torch's cast (nearest, even)   |
| fp8_e5m2 | ``torch.float8_e5m2`` bits, uint8   | 57344 | torch's cast (nearest, even)   |
| fp4_e2m1 | 4-bit OCP e2m1, ``s eem``           | 6     | nearest, ties to even mantissa |

FP8 codes *are* torch's float8 bit patterns (``(x / s).to(float8).view(uint8)``), so
decoding is the exact inverse ``codes.view(float8).float() * s``. FP4 e2m1 (OCP Microscaling
spec v1.0) has no torch cast on CPU, so it is implemented here on the eight magnitudes::

    bits  s e e m      code & 7 :  0    1    2    3    4    5    6    7
          3 2 1 0      magnitude:  0   0.5   1   1.5   2    3    4    6

A tie between two neighbours goes to the one with an even mantissa (an even code), e.g.
0.25 → 0, 0.75 → 1, 2.5 → 2, 5 → 4; magnitudes beyond 6 saturate. Bit 3 is the sign bit
of x, as in IEEE conversions: −0.0 and tiny negatives become −0 (code 8, which decodes to
−0.0 == 0). This is exactly torchao's ``_f32_to_floatx_unpacked(x, 2, 1)``. Unlike MXFP4
the scale is not forced to a power of two: it is an ordinary fp16/bf16/fp32 scale per group
(default 32 columns).
"""

from __future__ import annotations

import torch

from .base import NumberFormat, register_format, round_scale_up
from .scheme import QuantScheme

FP4_E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
# decision points between neighbouring magnitudes; a value exactly on one goes to the
# even code below or above it (see _FP4_TIE_UP)
_FP4_MIDPOINTS = (FP4_E2M1_VALUES[:-1] + FP4_E2M1_VALUES[1:]) / 2  # 0.25 0.75 … 5
# at midpoint k (between codes k and k+1) a tie rounds up iff code k+1 is even
_FP4_TIE_UP = torch.tensor([(k + 1) % 2 == 0 for k in range(7)])


def _absmax_scale(xg: torch.Tensor, fmax: float, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    return {"scales": round_scale_up(xg.abs().amax(-1, keepdim=True) / fmax, scheme.scale_dtype)}


class _Float8(NumberFormat):
    dtype: torch.dtype

    @property
    def fmax(self) -> float:
        return float(torch.finfo(self.dtype).max)

    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        return _absmax_scale(xg, self.fmax, scheme)

    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        # scales round up, so |x/s| <= FMAX up to one rounding; the clamp only guards that
        y = (xg / params["scales"]).clamp(-self.fmax, self.fmax)
        return y.to(self.dtype).view(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        return codes.view(self.dtype).to(torch.float32) * params["scales"]


@register_format
class Float8E4M3(_Float8):
    """``float8_e4m3fn`` (no infinities, max 448) with a scale per channel or group."""

    name = "fp8_e4m3"
    dtype = torch.float8_e4m3fn


@register_format
class Float8E5M2(_Float8):
    """``float8_e5m2`` (max 57344) with a scale per channel or group."""

    name = "fp8_e5m2"
    dtype = torch.float8_e5m2


@register_format
class Float4E2M1(NumberFormat):
    """OCP FP4 e2m1 values times a scale per group (default 32)."""

    name = "fp4_e2m1"
    fmax = 6.0

    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        return _absmax_scale(xg, self.fmax, scheme)

    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        y = xg / params["scales"]
        a = y.abs().clamp(max=self.fmax)
        mid = _FP4_MIDPOINTS.to(a.device)
        # code = number of midpoints strictly below |y|, plus the ties that round up
        mag = torch.bucketize(a, mid, right=False)  # mid[mag-1] < a <= mid[mag]
        on_mid = (mag < len(mid)) & (a == mid[mag.clamp(max=len(mid) - 1)])
        mag = mag + (on_mid & _FP4_TIE_UP.to(a.device)[mag.clamp(max=len(mid) - 1)]).long()
        sign = torch.signbit(y).to(torch.uint8) << 3
        return mag.to(torch.uint8) | sign

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        c = codes.long()
        mag = FP4_E2M1_VALUES.to(codes.device)[c & 7]
        sign = 1.0 - 2.0 * (c >> 3).to(torch.float32)
        return sign * mag * params["scales"]
