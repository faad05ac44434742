"""bitsandbytes' 4-bit codebooks, NF4 and FP4, with absmax blocks and QLoRA double quantization.

Bit-exact with ``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` (0.50.2, CPU,
fp32 input) whenever bitsandbytes' flattened blocks coincide with our groups — that is, for
``group`` granularity when the row length is a multiple of the block size (default 64):

* the same 16 values in the same code order (``NF4_CODE``, ``FP4_CODE``);
* the same scaling, ``y = clamp(x * (1 / absmax), -1, 1)`` in fp32;
* the same nearest-value decision: ``torch.bucketize`` on the midpoints of the sorted codebook,
  so a value exactly on a midpoint takes the *lower* of the two codebook values. FP4 holds
  0 twice (codes 0 and 8); values in (−0.0026, 0] get code 0 and values in (0, 0.0026] code 8,
  as bitsandbytes' sort puts code 0 before code 8 (both decode to zero);
* the absmax is kept in **float32** whatever ``scheme.scale_dtype`` says (bitsandbytes keeps
  fp32; ``bits_per_weight`` counts the 32 bits), so nf4 with blocks of 64 costs 4.5 bits.

Double quantization (``scheme.double_quant``, QLoRA) compresses those absmax values as
bitsandbytes does with ``compress_statistics=True``: subtract their mean (``nested_offset``),
then 8-bit blockwise quantization in blocks of 256 with the signed dynamic map and an fp32
absmax per block (``nested_absmax``). The 8-bit step reproduces bitsandbytes' CPU kernel
exactly — a 65536-entry lookup table indexed by ``trunc(fma((y + 1) / 2, 65535, 0.5))`` —
which is *not* always the nearest map value for tiny ``y``. Decoding multiplies by the
reconstructed absmax ``map[q] * nested_absmax + nested_offset``.

Stored tensors (names follow bitsandbytes' ``QuantState.as_dict``)::

    no dq:  absmax         float32 (R, G)
    dq:     absmax         uint8   (R, G)           8-bit codes of absmax − offset
            nested_absmax  float32 (ceil(R*G/256),) one per 256 codes, row-major over (R, G)
            nested_offset  float32 (1,)             mean of the fp32 absmax

Double quantization is a whole-tensor operation (one mean, blocks across rows): ``params`` of
the full grouped view reproduce what ``store``/``load`` give back; ``params`` of a slice
double-quantize that slice on its own.
"""

from __future__ import annotations

import torch

from .base import NumberFormat, register_format
from .scheme import QuantScheme

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
# FP4 (bitsandbytes' own, not OCP): 1 sign bit, 2 exponent bits with bias 2, 1 mantissa bit,
# normalised by its largest magnitude 12:  code & 7 = 0 1 2 3 4 5 6 7  ->  0 .0625 8 12 4 6 2 3
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12.0

DQ_BLOCK = 256
_LUT_SIZE = 65536


def _bounds(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints of the sorted codebook and the code of each sorted slot (stable sort)."""
    order = torch.sort(code, stable=True).indices
    values = code[order]
    return (values[:-1] + values[1:]) / 2, order


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``): 256 sorted values.

    Seven exponent levels 10^-6 … 10^0; level i holds 2^i linearly spaced fractions (bin
    centres of ``linspace(0.1, 1, 2^i + 1)``) of each sign; plus 0 and 1.
    """
    data: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def _dynamic_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: slot i (value −1 + 2i/65535) → index of the nearest code."""
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    val = (i + i) / float(_LUT_SIZE - 1) - 1.0
    # number of midpoints strictly below val (the C loop advances while mid < val)
    return torch.searchsorted(mids, val, right=False).clamp(max=len(code) - 1)


_DYNAMIC = dynamic_map()
_DYNAMIC_LUT = _dynamic_lut(_DYNAMIC)


def quantize_blockwise_8bit(v: torch.Tensor,
                            block: int = DQ_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes of 1-D fp32 ``v`` (dynamic map) and the fp32 absmax of each block.

    Mirrors bitsandbytes' ``quantize_blockwise`` CPU kernel (``cquantize_blockwise_cpu_fp32``).
    """
    n = v.numel()
    nb = -(-n // block)
    vb = torch.nn.functional.pad(v, (0, nb * block - n)).view(nb, block)  # (nb, block)
    absmax = vb.abs().amax(1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))  # all-zero: codes 0
    y = (vb * inv[:, None]).clamp(-1.0, 1.0)
    t = (y + 1.0) * 0.5
    # the C code rounds t*65535 + 0.5 once (an FMA); in float64 the product and sum are exact
    t = (t.to(torch.float64) * float(_LUT_SIZE - 1) + 0.5).to(torch.float32)
    idx = t.to(torch.int64) & 0xFFFF
    q = _DYNAMIC_LUT[idx].to(torch.uint8)
    q = torch.where(absmax[:, None] == 0, torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor,
                              block: int = DQ_BLOCK) -> torch.Tensor:
    n = q.numel()
    nb = absmax.numel()
    vals = _DYNAMIC[q.long()]
    vals = torch.nn.functional.pad(vals, (0, nb * block - n)).view(nb, block)
    return (vals * absmax[:, None]).reshape(-1)[:n]


def double_quantize(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """QLoRA: fp32 absmax (any shape) → uint8 codes (same shape), per-256 absmax, offset."""
    flat = absmax.reshape(-1)
    offset = flat.mean()
    q, a2 = quantize_blockwise_8bit(flat - offset)
    return {"absmax": q.view(absmax.shape), "nested_absmax": a2,
            "nested_offset": offset.reshape(1)}


def double_dequantize(stored: dict[str, torch.Tensor]) -> torch.Tensor:
    q = stored["absmax"]
    flat = dequantize_blockwise_8bit(q.reshape(-1), stored["nested_absmax"])
    return (flat + stored["nested_offset"]).view(q.shape)


class _Codebook4(NumberFormat):
    code: torch.Tensor

    def __init__(self) -> None:
        self.mids, self.order = _bounds(self.code)

    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """``absmax`` (encoder scale) and, with double quantization, ``absmax_dq`` (decoder's)."""
        absmax = xg.abs().amax(-1, keepdim=True).to(torch.float32)
        out = {"absmax": absmax}
        if scheme.double_quant:
            stored = double_quantize(absmax.reshape(absmax.shape[:2]))
            out["absmax_dq"] = double_dequantize(stored).reshape(absmax.shape)
        return out

    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        y = torch.clamp(xg * (1.0 / params["absmax"].clamp(min=1e-38)), -1, 1)
        slot = torch.bucketize(y, self.mids.to(y.device), right=False)
        return self.order.to(y.device)[slot].to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        scale = params["absmax_dq"] if "absmax_dq" in params else params["absmax"]
        return self.code.to(codes.device)[codes.long()] * scale

    def store(self, params: dict[str, torch.Tensor],
              scheme: QuantScheme) -> dict[str, torch.Tensor]:
        absmax = params["absmax"].reshape(params["absmax"].shape[:2]).to(torch.float32)
        if scheme.double_quant:
            return {k: v.contiguous() for k, v in double_quantize(absmax).items()}
        return {"absmax": absmax.contiguous()}

    def load(self, stored: dict[str, torch.Tensor], scheme: QuantScheme,
             pshape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """After a round trip the encoder's absmax is the reconstructed one."""
        if scheme.double_quant:
            a = double_dequantize(stored).reshape(*pshape, 1)
            return {"absmax": a, "absmax_dq": a}
        return {"absmax": stored["absmax"].to(torch.float32).reshape(*pshape, 1)}

    def layout(self, scheme: QuantScheme,
               pshape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if scheme.double_quant:
            n = pshape[0] * pshape[1]
            return {"absmax": (pshape, torch.uint8),
                    "nested_absmax": ((-(-n // DQ_BLOCK),), torch.float32),
                    "nested_offset": ((1,), torch.float32)}
        return {"absmax": (pshape, torch.float32)}


@register_format
class NF4(_Codebook4):
    """NormalFloat4 (QLoRA): 16 quantiles of N(0, 1) scaled to [−1, 1], code 7 = 0."""

    name = "nf4"
    code = NF4_CODE


@register_format
class FP4(_Codebook4):
    """bitsandbytes FP4: sign bit 3, magnitudes {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}."""

    name = "fp4"
    code = FP4_CODE
