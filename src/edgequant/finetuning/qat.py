"""Quantization-aware training: fake quantization with straight-through gradients, optional
learnable scales (LSQ), and LR-QAT's low-rank update inside the rounding.

The numbers are the integer format's own (:class:`edgequant.formats.integer.IntFormat`):
codes are its ``encode`` rounding (``clamp(round(w/s + z))``), values come from its ``decode``
and scales start from its ``params`` (RTN) or a quantized layer's stored ones, so what trains
is exactly what :func:`convert` stores. For a group of weights ``w`` with scale ``s`` and zero ``z``
(symmetric: ``z = 2^(b−1)``):

    u  = w/s + z                         (LR-QAT: u = Φ₀ + (α/r)·A·B + z, Φ₀ = w₀/s₀ frozen)
    q  = encode(w) = clamp(round(u), 0, 2^b − 1)
    ŵ  = decode(q̃) = s·(q̃ − z),   q̃ = q + [u in range]·(u − sg(u))    (sg: stop-gradient)

So ∂ŵ/∂w = 1 where ``u`` is in range, 0 where clamped (STE), and
∂ŵ/∂s = (q − z) − [in range]·w/s (LSQ's scale gradient; for LR-QAT ∂ŵ/∂s = q − z). Scales are
used at their storage precision (fp16 by default) with a straight-through rounding, so the
trained scale *is* the stored one. Embeddings and lm_head stay float.

LSQ's gradient scale (Esser et al. 2020; on by default, ``lsq_grad_scale``): the scale's
gradient is multiplied by ``g = 1/sqrt(N·Qp)``, ``N`` the weights per scale (the group size;
the layer's mean where the last group is partial) and ``Qp`` the largest positive level
(``2^(b−1) − 1`` symmetric, ``2^b − 1`` asymmetric), so a scale shared by many weights does
not take steps out of proportion to theirs. The forward value is unchanged bit for bit
(``s + (g·s − sg(g·s))``); only ∂/∂s above is multiplied by ``g``.

:func:`convert` turns every fake-quantized layer into a ``QuantLinear`` whose codes are
``q`` and scales ``s``: the converted model computes what the fake-quantized one did.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme
from ..formats.base import TORCH_DTYPES, get_format, group, ungroup
from ..nn.quant_linear import QuantLinear
from ..nn.surgery import replace_module


def _ste(value: torch.Tensor, grad_from: torch.Tensor) -> torch.Tensor:
    """``value`` exactly, with the gradient of ``grad_from`` (value + 0, bit for bit)."""
    return value + (grad_from - grad_from.detach())


def grad_scaled(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` exactly (``x + 0``), with its gradient multiplied by ``g``."""
    y = x * g
    return x.detach() + (y - y.detach())


def lsq_grad_factor(scheme: QuantScheme, weights_per_scale: float) -> float:
    """LSQ's ``g = 1/sqrt(N·Qp)`` for a scale shared by ``weights_per_scale`` weights."""
    qp = (1 << (scheme.bits - 1)) - 1 if scheme.symmetric else (1 << scheme.bits) - 1
    return 1.0 / math.sqrt(weights_per_scale * qp)


def stored_scale(s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scale at its storage precision, straight-through; kept positive."""
    dt = TORCH_DTYPES[scheme.scale_dtype]
    tiny = torch.finfo(dt).tiny
    r = s.detach().clamp(min=tiny).to(dt).to(torch.float32)
    return _ste(r, s)


def check_qat_scheme(scheme: QuantScheme, where: str = "") -> None:
    if scheme.format != "int" or not scheme.is_weight_only:
        raise SchemeError(f"{where + ': ' if where else ''}QAT trains weight-only integer "
                          f"schemes (w2–w8, symmetric or -asym), not {scheme.name}; for nf4 "
                          f"use --method qlora")


def _zero(params: dict[str, torch.Tensor], scheme: QuantScheme) -> torch.Tensor | float:
    return get_format("int").zero(params, scheme)  # type: ignore[attr-defined,no-any-return]


def fake_quantize_grouped(u: torch.Tensor, s: torch.Tensor, params: dict[str, torch.Tensor],
                          scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ŵ, q)`` for the grouped code-space values ``u`` (see the module docstring)."""
    maxq = (1 << scheme.bits) - 1
    fmt = get_format(scheme.format)
    q = torch.round(u.detach()).clamp(0, maxq)
    inside = (torch.round(u.detach()) >= 0) & (torch.round(u.detach()) <= maxq)
    q_ste = q + torch.where(inside, u - u.detach(), torch.zeros_like(u))
    w_hat = fmt.decode(q_ste, {**params, "scales": s}, scheme)
    return w_hat, q.to(torch.uint8)


def latent_in_cells(float_weight: torch.Tensor, qt: QuantizedTensor,
                    margin: float = 0.01) -> torch.Tensor:
    """The float weight nearest ``float_weight`` that rounds to ``qt``'s codes.

    Why: QAT from the dequantized codes starts every latent weight at its grid point, half a
    step from any boundary, so Adam at a fine-tuning learning rate flips almost no code. The
    unquantized weight keeps what rounding threw away (how close each weight is to the next
    code); clamping it into its code's cell, ``[q − ½ + margin, q + ½ − margin]`` in code
    space, keeps the base's codes exactly (RTN's are already there; GPTQ's compensations are
    kept) while the latent weights that were near a boundary stay near it.
    """
    if tuple(float_weight.shape) != tuple(qt.shape):
        raise SchemeError(f"the unquantized weight has shape {tuple(float_weight.shape)}, the "
                          f"quantized layer {tuple(qt.shape)}")
    params = qt.params()
    z = _zero(params, qt.scheme)
    q = group(qt.unpacked_codes().to(torch.float32), qt.scheme)
    u = group(float_weight.detach().to(torch.float32), qt.scheme) / params["scales"] + z
    u = torch.minimum(torch.maximum(u, q - 0.5 + margin), q + 0.5 - margin)
    return ungroup((u - z) * params["scales"], (qt.shape[0], qt.shape[1]))


class FakeQuantLinear(nn.Module):
    """A linear layer whose float weight is fake-quantized in every forward (see module doc).

    Attributes:
        weight: the float weight (trainable).
        scales: ``(R, G, 1)`` float32; a Parameter when learnable.
        zeros: ``(R, G, 1)`` integer (or, with ``-fz``, float) zero-points, frozen; None for
            symmetric schemes.
        grad_factor: what the scales' gradient is multiplied by (LSQ's ``g``; 1.0 without
            ``lsq_grad_scale``).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme,
                 params: dict[str, torch.Tensor], learn_scales: bool = True,
                 lsq_grad_scale: bool = True) -> None:
        super().__init__()
        check_qat_scheme(scheme)
        self.scheme = scheme
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        s = params["scales"].detach().to(torch.float32).clone()
        self.scales = nn.Parameter(s, requires_grad=learn_scales)
        self.zeros: torch.Tensor | None
        self.register_buffer("zeros", params["zeros"].detach().clone()
                             if "zeros" in params else None)
        self.grad_factor = lsq_grad_factor(scheme, weight.numel() / s.numel()) \
            if lsq_grad_scale else 1.0

    @classmethod
    def from_layer(cls, layer: nn.Module, scheme: QuantScheme | None = None,
                   learn_scales: bool = True, where: str = "",
                   float_weight: torch.Tensor | None = None,
                   lsq_grad_scale: bool = True) -> FakeQuantLinear:
        """From a float ``nn.Linear`` (RTN's scales under ``scheme``) or a ``QuantLinear``
        (its own codes and scales: GPTQ/AWQ's choices are the starting point; the latent
        weight is ``float_weight`` moved into those codes' cells, see :func:`latent_in_cells`,
        or the dequantized codes without it)."""
        if isinstance(layer, QuantLinear):
            qt = layer.quantized()
            if qt.g_idx is not None:
                raise SchemeError(f"{where}: act-order (g_idx) layers cannot be fake-quantized "
                                  f"in place; quantize the source without act_order")
            check_qat_scheme(qt.scheme, where)
            w = qt.dequantize() if float_weight is None else latent_in_cells(float_weight, qt)
            return cls(w, layer.bias, qt.scheme, qt.params(), learn_scales, lsq_grad_scale)
        if not isinstance(layer, nn.Linear):
            raise SchemeError(f"{where}: {type(layer).__name__} cannot be fake-quantized "
                              f"(nn.Linear or QuantLinear)")
        assert scheme is not None
        check_qat_scheme(scheme, where)
        fmt = get_format(scheme.format)
        params = fmt.params(group(layer.weight.detach().float(), scheme), scheme)
        return cls(layer.weight, layer.bias, scheme, params, learn_scales, lsq_grad_scale)

    def _params(self) -> dict[str, torch.Tensor]:
        return {} if self.zeros is None else {"zeros": self.zeros}

    def code_space(self, s: torch.Tensor) -> torch.Tensor:
        """``u = w/s + z`` on the grouped view."""
        return group(self.weight, self.scheme) / s + _zero(self._params(), self.scheme)

    def fake_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ŵ (out, in), codes (R, G, g))``."""
        scales: torch.Tensor = self.scales
        if self.grad_factor != 1.0 and scales.requires_grad:
            scales = grad_scaled(scales, self.grad_factor)
        s = stored_scale(scales, self.scheme)
        w_hat, q = fake_quantize_grouped(self.code_space(s), s, self._params(), self.scheme)
        return ungroup(w_hat, (self.out_features, self.in_features)), q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_weight()[0], self.bias)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedTensor:
        """The packed tensor whose codes are this layer's rounded, clamped weights."""
        s = stored_scale(self.scales, self.scheme)
        _, q = self.fake_weight()
        params = {**self._params(), "scales": s.detach()}
        return QuantizedTensor.from_codes(q, params, self.scheme,
                                          (self.out_features, self.in_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, learn_scales={self.scales.requires_grad}, "
                f"grad_factor={self.grad_factor:.4g}")


class LRQATLinear(FakeQuantLinear):
    """LR-QAT: frozen ``Φ₀ = w₀/s₀`` plus a trainable low-rank ``(α/r)·A·B`` inside the
    rounding, and learnable scales; merges into integer codes (the artifact stays its size).
    ``B`` starts at zero, so the initial codes are the base's; ``Φ₀`` is kept in float32.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: QuantScheme,
                 params: dict[str, torch.Tensor], learn_scales: bool = True, rank: int = 16,
                 alpha: float = 16.0, lsq_grad_scale: bool = True) -> None:
        super().__init__(weight, bias, scheme, params, learn_scales, lsq_grad_scale)
        w = self.weight.detach()
        del self.weight
        phi = group(w, scheme) / stored_scale(self.scales, scheme).detach()
        self.phi0: torch.Tensor
        self.register_buffer("phi0", phi)
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(self.out_features, rank))
        self.lora_B = nn.Parameter(torch.zeros(rank, self.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # entries ~1/√r, as LoRA's A

    def code_space(self, s: torch.Tensor) -> torch.Tensor:
        delta = group(self.scaling * (self.lora_A @ self.lora_B), self.scheme)
        return self.phi0 + delta + _zero(self._params(), self.scheme)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rank={self.rank}"


def prepare(module: nn.Module, layers: dict[str, QuantScheme | None], *,
            learn_scales: bool = True, low_rank: int | None = None,
            alpha: float | None = None, lsq_grad_scale: bool = True,
            scale_lr_mult: float = 1.0, float_module: nn.Module | None = None
            ) -> dict[str, FakeQuantLinear]:
    """Replace each named layer by its fake-quantized twin (a ``None`` scheme: the
    ``QuantLinear``'s own). Everything else is frozen. ``low_rank`` selects LR-QAT;
    ``lsq_grad_scale`` multiplies the scales' gradient by LSQ's ``g`` (module docstring).

    ``float_module``: the unquantized model, whose weights (same layer names) start the latent
    weights of quantized layers (:func:`latent_in_cells`). ``scale_lr_mult``: the scales'
    learning rate relative to the weights' (the loop's ``lr_mult``).
    """
    for p in module.parameters():
        p.requires_grad_(False)
    out: dict[str, FakeQuantLinear] = {}
    for name, scheme in layers.items():
        layer = module.get_submodule(name)
        fw = None
        if float_module is not None and isinstance(layer, QuantLinear):
            w = float_module.get_submodule(name).weight
            fw = w if isinstance(w, torch.Tensor) else None
        fq = FakeQuantLinear.from_layer(layer, scheme, learn_scales, where=name,
                                        float_weight=fw, lsq_grad_scale=lsq_grad_scale)
        if low_rank is not None:
            w = fq.weight.detach()
            params = {**fq._params(), "scales": fq.scales.detach()}
            fq = LRQATLinear(w, fq.bias, fq.scheme, params, learn_scales, low_rank,
                             alpha if alpha is not None else float(low_rank), lsq_grad_scale)
        fq.scales.lr_mult = scale_lr_mult  # type: ignore[attr-defined]
        replace_module(module, name, fq)
        out[name] = fq
    return out


def convert(module: nn.Module, method: str = "qat") -> dict[str, dict[str, Any]]:
    """Replace every fake-quantized layer by a ``QuantLinear`` with its trained codes; the
    manifest records of the converted layers."""
    records: dict[str, dict[str, Any]] = {}
    for name, m in list(module.named_modules()):
        if isinstance(m, FakeQuantLinear):
            ql = QuantLinear(m.to_quantized(), m.bias)
            replace_module(module, name, ql)
            records[name] = {"scheme": ql.scheme.to_dict(), "method": method,
                             "module": "quant_linear", "shape": [ql.out_features,
                                                                 ql.in_features],
                             "bias": ql.bias is not None, **ql.record_extra()}
    return records
