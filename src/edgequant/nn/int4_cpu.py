"""``Int4CpuLinear``: a 4-bit layer run by torch's fused int4 CPU kernel, for inference.

Why: ``QuantLinear`` dequantizes its whole weight on every call. For one decode token that
costs ~20× the matmul itself (1.3 ms against 50–80 µs for a 1536×576 layer on this CPU), so
native artifacts decoded at 3–5 tok/s. torch's ``_weight_int4pack_mm_for_cpu`` multiplies
bf16 activations by packed 4-bit codes directly; it is fast for a few rows (decode) and slow
for many, so prompts (more than ``FUSED_MAX_ROWS`` rows) dequantize and call a dense matmul.

The kernel computes ``w = (q − 8)·s + z`` per group of ``kg`` input columns; ours is
``w = (q − zp)·s`` (``zp`` = 8 for symmetric, an integer or float zero-point otherwise), so
``z = (8 − zp)·s``. Scales and zeros are held in bf16 (the kernel's dtype): the same
rounding a bf16 runtime applies to every other weight. The kernel needs ``kg`` to divide
``K``; a ragged last group (576 = 4·128 + 64) is served by a smaller ``kg`` dividing both
(64), with each scale repeated. Its packed layout (checked against torch's converter in the
tests) stores, per block of 64 output rows and per input column, 32 bytes: row ``j`` in the
low nibble, row ``j + 32`` in the high one.

The layer replaces a ``QuantLinear`` one-way (:func:`prepare_for_inference`) and holds no
other copy of the codes: its memory is the codes (4 bits) plus bf16 scale/zero pairs
(32/kg bits per weight). It cannot be saved; artifacts keep ``QuantLinear``'s layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant_linear import QuantLinear

KERNEL_GROUPS = (256, 128, 64, 32)
FUSED_MAX_ROWS = 16   # above this the kernel is slower than dequantize + dense (measured)
_BLOCK_N = 64         # the kernel layout's row block (the layout below assumes N % 64 == 0)


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def kernel_group(layer: QuantLinear) -> int | None:
    """The kernel group size for ``layer``, or None when the kernel cannot run it."""
    s = layer.scheme
    n, k = layer.out_features, layer.in_features
    if (s.format != "int" or s.bits != 4 or s.granularity == "tensor" or n % _BLOCK_N
            or getattr(layer, "g_idx", None) is not None or not kernel_available()):
        return None
    g = k if s.granularity == "channel" else s.group_size
    assert g is not None
    return next((kg for kg in KERNEL_GROUPS if g % kg == 0 and k % kg == 0), None)


def unpack_kernel_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes ``(n, k)`` uint8 from the kernel's packed ``(n, k/2)`` layout."""
    blocks = packed.reshape(n // _BLOCK_N, k, _BLOCK_N // 2)
    rows = torch.cat([blocks & 15, blocks >> 4], dim=-1)        # (n/64, k, 64)
    return rows.permute(0, 2, 1).reshape(n, k)


class Int4CpuLinear(nn.Module):
    """y = x · Wᵀ + b with W as packed 4-bit codes and per-group bf16 scale/zero pairs."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, group: int,
                 shape: tuple[int, int], bias: torch.Tensor | None, scheme_name: str) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.group = group
        self.scheme_name = scheme_name
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)   # (K/kg, N, 2) bf16
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> Int4CpuLinear:
        kg = kernel_group(layer)
        if kg is None:
            raise ValueError(f"{layer.scheme.name} {layer.out_features}×{layer.in_features} "
                             "is not something the int4 CPU kernel runs")
        qt = layer.quantized()
        n, k = qt.shape
        params = qt.params()                                   # (n, groups, 1) float32
        s = params["scales"][..., 0]
        zp = params["zeros"][..., 0] if "zeros" in params else torch.full_like(s, 8.0)
        z = (8.0 - zp) * s
        g = k if qt.scheme.granularity == "channel" else qt.scheme.group_size
        assert g is not None
        rep = g // kg
        s, z = (t.repeat_interleave(rep, dim=1)[:, :k // kg] for t in (s, z))
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()
        codes = qt.unpacked_codes().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return cls(packed, sz, kg, (n, k), layer.bias, qt.scheme.name)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        q = unpack_kernel_layout(self.packed, n, k).to(dtype).view(n, k // self.group, self.group)
        sz = self.scales_zeros.to(dtype)
        s, z = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]   # (n, k/kg, 1)
        return ((q - 8) * s + z).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= FUSED_MAX_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(rows, self.in_features), self.packed, self.group, self.scales_zeros)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), b)

    def _save_to_state_dict(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("Int4CpuLinear is an inference-only layout; save the model before "
                           "prepare_for_inference (artifacts keep QuantLinear's layout)")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme_name}, kernel_group={self.group}")


def prepare_for_inference(module: nn.Module) -> int:
    """Replace every ``QuantLinear`` the kernel can run by an ``Int4CpuLinear`` (one layer at
    a time, so peak memory grows by one layer); the number replaced."""
    from .surgery import replace_module

    todo = [(name, m) for name, m in module.named_modules()
            if type(m) is QuantLinear and kernel_group(m) is not None]
    for name, m in todo:
        replace_module(module, name, Int4CpuLinear.from_quant_linear(m))
    return len(todo)
