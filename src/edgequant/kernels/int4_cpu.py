"""``int4_cpu``: 4-bit integer layers on torch's fused int4 CPU kernel.

Why: the reference kernel dequantizes the whole weight on every call. For one decode token
that costs ~20× the matmul itself (1.3 ms against 50–80 µs for a 1536×576 layer on this CPU),
so native artifacts decoded at 3–5 tok/s. torch's ``_weight_int4pack_mm_for_cpu`` multiplies
bf16 activations by packed 4-bit codes directly; it is fast for a few rows (decode) and slow
for many, so inputs of more than ``FUSED_MAX_ROWS`` rows (prompts) dequantize this layout and
call a dense matmul — part of this kernel, stated in its summary.

The kernel computes ``w = (q − 8)·s + z`` per group of ``kg`` input columns; ours is
``w = (q − zp)·s`` (``zp`` = 8 for symmetric, an integer or float zero-point otherwise), so
``z = (8 − zp)·s``. Scales and zeros are held in bf16 (the kernel's dtype): the same
rounding a bf16 runtime applies to every other weight. The kernel needs ``kg`` to divide
``K``; a ragged last group (576 = 4·128 + 64) is served by a smaller ``kg`` dividing both
(64), with each scale repeated. Its packed layout (checked against torch's converter in the
tests and by the self-check) stores, per block of 64 output rows and per input column, 32
bytes: row ``j`` in the low nibble, row ``j + 32`` in the high one::

    packed (N, K/2) uint8, viewed as (N/64, K, 32):  byte [b, c, j] = q[64b + j, c]
                                                                  | q[64b + j + 32, c] << 4

The layout holds the only copy of the codes (4 bits per weight) plus bf16 scale/zero pairs
(32/kg bits per weight). It does not keep the artifact's fp16 scales or integer zeros, so a
layer on this kernel cannot be saved: save before prepacking (artifacts keep the reference
layout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import QuantizedTensor, QuantScheme, quantize_tensor
from .registry import Kernel, LayerSpec, Packed, dtype_name, register_kernel

KERNEL_GROUPS = (256, 128, 64, 32)
FUSED_MAX_ROWS = 16   # above this the kernel is slower than dequantize + dense (measured)
BLOCK_N = 64          # the layout's row block (the layout below assumes N % 64 == 0)


def kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def kernel_group(scheme: QuantScheme, k: int) -> int | None:
    """The kernel group size for a 4-bit ``scheme`` with ``k`` input columns: the largest of
    :data:`KERNEL_GROUPS` dividing both the scheme's group and ``k`` (None: none does)."""
    g = k if scheme.granularity == "channel" else scheme.group_size
    if g is None:
        return None
    return next((kg for kg in KERNEL_GROUPS if g % kg == 0 and k % kg == 0), None)


def unpack_kernel_layout(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes ``(n, k)`` uint8 from the kernel's packed ``(n, k/2)`` layout."""
    blocks = packed.reshape(n // BLOCK_N, k, BLOCK_N // 2)
    rows = torch.cat([blocks & 15, blocks >> 4], dim=-1)        # (n/64, k, 64)
    return rows.permute(0, 2, 1).reshape(n, k)


@register_kernel
class Int4CpuKernel(Kernel):
    name = "int4_cpu"
    priority = 20
    summary = (f"torch's fused `_weight_int4pack_mm_for_cpu` (bf16 activations × packed int4, "
               f"bf16 scale/zero per group) for ≤{FUSED_MAX_ROWS} rows; longer inputs "
               f"(prompts) dequantize its layout and run a dense bf16 matmul")

    def claims(self, scheme: QuantScheme) -> bool:
        return scheme.format == "int" and scheme.bits == 4 and scheme.act_bits is None

    def supports(self, spec: LayerSpec) -> str | None:
        s, (n, k) = spec.scheme, spec.shape
        if not self.claims(s):
            return f"takes 4-bit weight-only integer schemes, not {s.name}"
        if not kernel_available():
            return f"this torch ({torch.__version__}) has no _weight_int4pack_mm_for_cpu"
        if spec.device != "cpu":
            return f"runs on CPU, not {spec.device}"
        if spec.act_dtype != torch.bfloat16:
            return f"multiplies bfloat16 activations, not {dtype_name(spec.act_dtype)}"
        if s.granularity == "tensor":
            return "needs a scale per group or channel, not one per tensor"
        if spec.act_order:
            return "act-order codes (g_idx) are not in contiguous groups"
        if n % BLOCK_N:
            return f"{n} output rows are not a multiple of {BLOCK_N}"
        if kernel_group(s, k) is None:
            return (f"no kernel group of {'/'.join(map(str, KERNEL_GROUPS))} divides both the "
                    f"group {s.group_size} and K={k}")
        return None

    def self_check(self) -> str | None:
        """Our reading of torch's layout, and the fused product, on a small random layer."""
        n, k = 64, 128
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        if not torch.equal(unpack_kernel_layout(packed, n, k).to(torch.int32), codes):
            return "torch's int4 packed layout is not the one this kernel reads"
        qt = quantize_tensor(torch.randn(n, k, generator=gen), "w4g64-asym")
        spec = LayerSpec(qt.scheme, qt.shape, torch.bfloat16, "cpu")
        p = self.prepack(qt, spec)
        x = torch.randn(3, k, generator=gen).bfloat16()
        want = F.linear(x.float(), self.dequantize(p, torch.float32))
        err = (self.matmul(x, p, None).float() - want).norm() / want.norm()
        return None if err < 1e-2 else f"fused product off by {float(err):.3g} (relative)"

    def prepack(self, qt: QuantizedTensor, spec: LayerSpec) -> Packed:
        n, k = qt.shape
        kg = kernel_group(qt.scheme, k)
        assert kg is not None, "prepack only what supports() accepts"
        params = qt.params()                                   # (n, groups, 1) float32
        s = params["scales"][..., 0]
        zp = params["zeros"][..., 0] if "zeros" in params else torch.full_like(s, 8.0)
        z = (8.0 - zp) * s
        g = k if qt.scheme.granularity == "channel" else qt.scheme.group_size
        assert g is not None
        rep = g // kg
        s, z = (t.repeat_interleave(rep, dim=1)[:, :k // kg] for t in (s, z))
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # (K/kg, N, 2)
        codes = qt.unpacked_codes().to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)     # (N, K/2)
        return Packed(qt.scheme, qt.shape, {"codes": packed, "scales_zeros": sz},
                      {"group": kg})

    def matmul(self, x: torch.Tensor, packed: Packed,
               bias: torch.Tensor | None) -> torch.Tensor:
        n, k = packed.shape
        rows = x.numel() // k
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and rows <= FUSED_MAX_ROWS:
            t = packed.tensors
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.reshape(rows, k), t["codes"], packed.meta["group"], t["scales_zeros"])
            y = y.reshape(*x.shape[:-1], n)
            return y if bias is None else y + bias.to(y.dtype)
        b = None if bias is None else bias.to(x.dtype)
        return F.linear(x, self.dequantize(packed, x.dtype), b)

    def dequantize(self, packed: Packed, dtype: torch.dtype) -> torch.Tensor:
        """``(q − 8)·s + z`` from the layout (scales and zeros as the kernel holds them)."""
        (n, k), kg = packed.shape, packed.meta["group"]
        q = unpack_kernel_layout(packed.tensors["codes"], n, k).to(dtype).view(n, k // kg, kg)
        sz = packed.tensors["scales_zeros"].to(dtype)
        s, z = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]   # (n, k/kg, 1)
        return ((q - 8) * s + z).view(n, k)
