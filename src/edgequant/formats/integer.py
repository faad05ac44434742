"""Affine integer quantization, 2–8 bits: q = clamp(round(x/s) + z, 0, 2^b − 1), x̂ = s·(q − z).

Symmetric (the GPTQ reference's convention, full code range): s = 2·max|x| / (2^b − 1) and a
fixed z = 2^(b−1), so only scales are stored. Asymmetric: the range [min(x, 0), max(x, 0)]
maps onto [0, 2^b − 1]; the integer zero-point is stored packed at b bits per group — or, with
``float_zero`` (HQQ's storage), as a float in the scale dtype, with q = clamp(round(x/s + z)).
Either way every value is within half a step of its reconstruction (scales round up, see
``round_scale_up``).
"""

from __future__ import annotations

import torch

from .base import TORCH_DTYPES, Layout, NumberFormat, register_format, round_scale_up
from .packing import pack, packed_nbytes, unpack
from .scheme import QuantScheme


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor,
                       scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Scale (and zero-point) covering ``[xmin, xmax]`` — shared by RTN, GPTQ and clip searches."""
    maxq = (1 << scheme.bits) - 1
    if scheme.symmetric:
        amax = torch.maximum(xmin.abs(), xmax.abs())
        return {"scales": round_scale_up(2 * amax / maxq, scheme.scale_dtype)}
    lo, hi = xmin.clamp(max=0), xmax.clamp(min=0)
    s = round_scale_up((hi - lo) / maxq, scheme.scale_dtype)
    if scheme.float_zero:
        return {"scales": s, "zeros": round_zero(-lo / s, scheme)}
    z = torch.clamp(torch.round(-lo / s), 0, maxq)
    return {"scales": s, "zeros": z}


def round_zero(z: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """A float zero-point at its storage precision (what encode and decode both see)."""
    z = z.clamp(0, (1 << scheme.bits) - 1)
    return z.to(TORCH_DTYPES[scheme.scale_dtype]).to(torch.float32)


@register_format
class IntFormat(NumberFormat):
    name = "int"

    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        return qparams_from_range(xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True), scheme)

    def zero(self, params: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor | float:
        return params["zeros"] if "zeros" in params else float(1 << (scheme.bits - 1))

    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        if scheme.float_zero:
            q = torch.round(xg / params["scales"] + params["zeros"])
        else:
            q = torch.round(xg / params["scales"]) + self.zero(params, scheme)
        return q.clamp(0, (1 << scheme.bits) - 1).to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        return (codes.to(torch.float32) - self.zero(params, scheme)) * params["scales"]

    def store(self, params: dict[str, torch.Tensor],
              scheme: QuantScheme) -> dict[str, torch.Tensor]:
        out = {"scales": params["scales"].reshape(params["scales"].shape[:2])
               .to(TORCH_DTYPES[scheme.scale_dtype]).contiguous()}
        if "zeros" in params and scheme.float_zero:
            out["zeros"] = params["zeros"].reshape(out["scales"].shape) \
                .to(TORCH_DTYPES[scheme.scale_dtype]).contiguous()
        elif "zeros" in params:
            out["zeros"] = pack(params["zeros"].to(torch.uint8), scheme.bits)
        return out

    def load(self, stored: dict[str, torch.Tensor], scheme: QuantScheme,
             pshape: tuple[int, int]) -> dict[str, torch.Tensor]:
        out = {"scales": stored["scales"].to(torch.float32).reshape(*pshape, 1)}
        if "zeros" in stored and scheme.float_zero:
            out["zeros"] = stored["zeros"].to(torch.float32).reshape(*pshape, 1)
        elif "zeros" in stored:
            n = pshape[0] * pshape[1]
            out["zeros"] = unpack(stored["zeros"], scheme.bits, n).to(torch.float32) \
                .reshape(*pshape, 1)
        return out

    def layout(self, scheme: QuantScheme,
               pshape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out: Layout = {"scales": (pshape, TORCH_DTYPES[scheme.scale_dtype])}
        if scheme.float_zero:
            out["zeros"] = (pshape, TORCH_DTYPES[scheme.scale_dtype])
        elif not scheme.symmetric:
            out["zeros"] = ((packed_nbytes(pshape[0] * pshape[1], scheme.bits),), torch.uint8)
        return out
