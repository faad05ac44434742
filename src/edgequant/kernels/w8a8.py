"""Int8 weights × int8 activations: the integer matmul that W8A8 schemes define.

Weights are stored as the ``int`` format stores them (``w8a8`` = 8-bit symmetric codes, one
scale per output channel; codes offset by ``2^(b-1)``). The product is what an int8 engine
computes::

    x (M, K) float ──quantize──▶ x_q int8, s_x      per token (dynamic) or one calibrated
                                                    scale (static, ``act_scale``)
    acc = x_q · W_qᵀ            int32 (M, N)        exact
    y   = acc · s_x · s_w + b   float               s_w per output channel (or tensor)

Activations use the symmetric range ``[-127, 127]``: ``s_x = max|x| / 127``. The reference
kernel computes ``acc`` with float64 products (exact: every sum is below 127·128·K < 2^53);
``w8a8_int_mm`` prepacks the signed codes once and calls ``torch._int_mm``: the same int32
accumulator, so the same output bit for bit.
"""

from __future__ import annotations

import torch

from ..formats import QuantizedTensor, QuantScheme, get_format
from ..formats.packing import pack
from .registry import Kernel, KernelError, LayerSpec, Packed, register_kernel

QMAX = 127


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a ``(M, K)`` activation, one scale per row: (codes, (M, 1))."""
    amax = x.abs().amax(-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    return quantize_with_scale(x, scale), scale


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale), -127, 127)``."""
    return torch.round(x.float() / scale).clamp(-QMAX, QMAX).to(torch.int8)


def quantize_input(x: torch.Tensor, act_scale: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``x (M, K)`` and their scale: ``(M, 1)`` per token when ``act_scale`` is
    None, else the static ``(1,)`` scale."""
    if act_scale is None:
        return quantize_per_token(x)
    scale = act_scale.detach().float()
    return quantize_with_scale(x, scale), scale


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

    ``torch._int_mm`` when asked and it takes the shapes (None: whenever it does); otherwise
    float64 products, which are exact.
    """
    if use_int_mm is None or use_int_mm:
        use_int_mm = int_mm_ok(a, b)
    if use_int_mm:
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)


def why_not_w8a8(scheme: QuantScheme) -> str | None:
    """None when integer matmul can run ``scheme`` (symmetric integer weights with one scale
    per channel or tensor, 8-bit activations), else why not."""
    if scheme.act_bits != 8:
        return (f"scheme {scheme.name} quantizes no activations; W8A8 layers need an "
                f"activation scheme such as w8a8 or w8a8-static")
    if scheme.format != "int" or not scheme.symmetric or scheme.granularity == "group":
        return (f"scheme {scheme.name}: W8A8 layers need symmetric integer weights with one "
                f"scale per channel or per tensor (e.g. w8a8)")
    return None


def signed_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Signed weight codes ``(N, K)`` int8 (stored codes minus ``2^(b-1)``)."""
    codes = qt.unpacked_codes()
    return (codes.to(torch.int16) - (1 << (qt.scheme.bits - 1))).to(torch.int8)


def weight_scales(qt: QuantizedTensor) -> torch.Tensor:
    """Weight scales as a ``(1, N)`` (per channel) or ``(1, 1)`` (per tensor) float32 row."""
    return qt.params()["scales"].reshape(1, -1)


def w8a8_matmul(x: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor,
                act_scale: torch.Tensor | None, bias: torch.Tensor | None,
                use_int_mm: bool) -> torch.Tensor:
    """``x (…, K)`` through the integer pipeline above with signed codes ``w (N, K)``."""
    n, k = w.shape
    x2 = x.reshape(-1, k)
    xq, sx = quantize_input(x2, act_scale)
    acc = int8_matmul(xq, w.to(x.device), use_int_mm)                   # (M, N) int32
    y = acc.float() * (sx * w_scales)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def static_scale(packed: Packed) -> torch.Tensor | None:
    """The layer's calibrated activation scale, which a static scheme cannot run without."""
    if not packed.scheme.act_dynamic and packed.act_scale is None:
        raise KernelError(f"scheme {packed.scheme.name} has static activation ranges, and this "
                          f"layer has no calibrated act_scale")
    return None if packed.scheme.act_dynamic else packed.act_scale


@register_kernel
class Int8MatmulKernel(Kernel):
    """Prepacked signed int8 codes × per-token (or static) int8 activations by
    ``torch._int_mm``; shapes CUDA's ``_int_mm`` refuses (M ≤ 16) take the exact float64
    product the reference uses, with the same result."""

    name = "w8a8_int_mm"
    priority = 10
    summary = ("`torch._int_mm`: int8 activations × prepacked int8 weights, int32 accumulate "
               "(bit-exact with the reference)")
    exact = True

    def claims(self, scheme: QuantScheme) -> bool:
        return scheme.act_bits is not None

    def supports(self, spec: LayerSpec) -> str | None:
        if not hasattr(torch, "_int_mm"):
            return f"this torch ({torch.__version__}) has no _int_mm"
        if (why := why_not_w8a8(spec.scheme)) is not None:
            return why
        if spec.device not in ("cpu", "cuda"):
            return f"torch._int_mm runs on CPU and CUDA, not {spec.device}"
        n, k = spec.shape
        if spec.device == "cuda" and (k % 8 or n % 8 or k < 16):
            return f"CUDA's _int_mm needs K ≥ 16 and K, N multiples of 8, not {n}×{k}"
        if not spec.act_dtype.is_floating_point:
            return f"takes float activations, not {spec.act_dtype}"
        return None

    def self_check(self) -> str | None:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (5, 40), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (24, 40), generator=gen, dtype=torch.int8)
        a[0], b[0] = -128, -128
        exact = (a.long() @ b.long().T).to(torch.int32)
        got = torch._int_mm(a, b.t())
        return None if torch.equal(got, exact) else "torch._int_mm differs from the exact product"

    def prepack(self, qt: QuantizedTensor, spec: LayerSpec) -> Packed:
        tensors = {"weight": signed_codes(qt).contiguous().to(spec.device),
                   "scales": weight_scales(qt).contiguous().to(spec.device)}
        return Packed(qt.scheme, qt.shape, tensors)

    def matmul(self, x: torch.Tensor, packed: Packed,
               bias: torch.Tensor | None) -> torch.Tensor:
        t = packed.tensors
        return w8a8_matmul(x, t["weight"], t["scales"], static_scale(packed), bias,
                           use_int_mm=True)

    def dequantize(self, packed: Packed, dtype: torch.dtype) -> torch.Tensor:
        t = packed.tensors
        return (t["weight"].float() * t["scales"].T).to(dtype)

    def unpack(self, packed: Packed) -> QuantizedTensor:
        """Exact: the codes are the signed ones plus ``2^(b-1)``, the float32 scales hold
        their stored values."""
        s = packed.scheme
        w, scales = packed.tensors["weight"], packed.tensors["scales"]
        codes = (w.to(torch.int16) + (1 << (s.bits - 1))).to(torch.uint8)
        rows = 1 if s.granularity == "tensor" else packed.shape[0]
        stored = get_format(s.format).store({"scales": scales.reshape(rows, 1, 1)}, s)
        return QuantizedTensor(s, packed.shape, pack(codes, s.bits), stored)
