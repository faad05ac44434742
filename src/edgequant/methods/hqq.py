"""HQQ, Half-Quadratic Quantization (Badri & Shaji, 2023): calibration-free, per group.

With the codes ``W_q = clamp(round(W/s + z), 0, 2^b − 1)`` and ``W_r = s·(W_q − z)``, HQQ
minimizes a sparsity-promoting ``‖W − W_r‖_p^p`` (p = 0.7 < 1: a few large errors are cheap,
many small ones are not) by half-quadratic splitting with an auxiliary error ``W_e``:

    W_e ← shrink_p(W − W_r, β)                     generalized soft threshold:
                                                   sign(x)·relu(|x| − |x|^(p−1)/β)
    z   ← mean_group(W_q − (W − W_e)/s)            closed-form zero-point (least squares)
    β   ← κ·β                                      β₀ = 10, κ = 1.01, up to 20 iterations

which is ``optimize_weights_proximal_legacy`` of the reference (hqq 0.2.8, ``core/optimize.py``)
in our convention (``s`` is the step; HQQ works with ``1/s``). Iteration stops when the mean
``|W − W_r|`` of the whole tensor stops improving.

The zero-point, and why we refit the scale by default. HQQ stores float (fp16) zero-points.
Our ``int`` format stores asymmetric zero-points as b-bit integers, and the reference's
zero-only optimization moves each zero by less than half a step: rounding it back lands on
RTN's zero, so zero-only HQQ with integer storage *is* RTN (measured: identical errors at 2, 3,
4 and 8 bits; with float zeros it is 2–6 % lower in mean |W − Ŵ|). Schemes with ``-fz``
(``w4g64-asym-fz``) store the float zero-point as HQQ does. For integer zeros, by default
(``optimize_scale=True``) each step solves the least-squares problem for scale and zero jointly,
``(s, z) = argmin ‖s·(W_q − z) − (W − W_e)‖²`` — the same half-quadratic step with one more
free parameter — then :func:`hqq_quantize` rounds z to the better integer neighbour and refits
the scale with that zero fixed. ``optimize_scale=False`` is the reference's algorithm exactly;
:func:`hqq_params` returns its float zero-points, which ``-fz`` schemes store (4 + 32/128 =
4.25 bits at 4-bit g128, against 4 + (16 + 4)/128 = 4.156 with integer zeros). Symmetric
schemes have a fixed zero-point, so their scale is the parameter refitted.

Other differences from the reference, each deliberate:

* Each group keeps its best parameters seen (by its mean ``|W − W_r|``); the reference returns
  the zero-point *after* the step that stopped improving.
* Initial parameters are our asymmetric RTN's (range ``[min(w, 0), max(w, 0)]``, scale rounded
  up to the storage dtype) rather than the plain ``[min, max]``: identical for groups that
  straddle zero (nearly every weight group), and always storable.
* Padding of a ragged last group is masked out of every mean.
* Float32 throughout (the reference uses fp16 on CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme, get_format
from ..formats.base import TORCH_DTYPES, group, round_scale_up, ungroup
from ..formats.integer import qparams_from_range, round_zero
from ..formats.tensor import check_weight
from .registry import Quantizer, register

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class HQQConfig:
    """Options of the ``hqq`` method (the reference's ``opt_params``).

    Attributes:
        lp_norm: p of the ‖·‖_p^p error (0 < p ≤ 1).
        beta: initial penalty β₀ of the half-quadratic splitting.
        kappa: β grows by this factor per iteration (> 1).
        iters: maximum number of iterations.
        early_stop: stop when the mean |W − W_r| of the tensor no longer improves.
        optimize_scale: refit the scale with the zero-point each iteration (see the module
            docstring; False is the reference's zero-only algorithm). Symmetric schemes always
            refit the scale, their only free parameter.
    """

    lp_norm: float = 0.7
    beta: float = 1e1
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    optimize_scale: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.lp_norm <= 1:
            raise SchemeError(f"hqq lp_norm must be in (0, 1], not {self.lp_norm}")
        if self.beta <= 0 or self.kappa <= 1 or self.iters < 1:
            raise SchemeError("hqq needs beta > 0, kappa > 1 and iters >= 1")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal operator of ``|x|^p / β`` (generalized soft threshold); 0 stays 0."""
    a = x.abs()
    if p == 1:
        return torch.sign(x) * (a - 1.0 / beta).clamp(min=0)
    thresh = a.clamp(min=torch.finfo(a.dtype).tiny).pow(p - 1) / beta
    return torch.sign(x) * (a - thresh).clamp(min=0)


def _codes(xg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(xg / s + z), 0, maxq)  # float codes, (R, G, g)


def _group_mean(t: torch.Tensor, valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    return (t * valid).sum(-1, keepdim=True) / n  # (R, G, 1)


def hqq_optimize(xg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int,
                 config: HQQConfig, valid: torch.Tensor, fit_zero: bool = True,
                 fit_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The proximal zero-point (and optionally scale) optimization, pure tensors.

    Args:
        xg: grouped weights (R, G, g), float32.
        s, z: initial step and zero-point (R, G, 1), float32 (z need not be an integer).
        bits: code width; codes are clamped to [0, 2^bits − 1].
        config: the schedule.
        valid: (1 or R, G, g) 1.0 for real entries, 0.0 for padding.
        fit_zero / fit_scale: which parameters move.

    Returns:
        ``(s, z)`` (R, G, 1): per group the best pair seen by mean |W − W_r|.
    """
    maxq = (1 << bits) - 1
    n = valid.sum(-1, keepdim=True).clamp(min=1)            # (·, G, 1)
    n_all = float(valid.expand_as(xg).sum())
    best_s, best_z = s.clone(), z.clone()
    best_err = torch.full_like(s, float("inf"))
    best_total = float("inf")
    beta = config.beta
    for _ in range(config.iters):
        W_q = _codes(xg, s, z, maxq)
        W_r = s * (W_q - z)
        abs_err = (xg - W_r).abs() * valid                  # (R, G, g)
        err = abs_err.sum(-1, keepdim=True) / n             # (R, G, 1)
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
        total = float(abs_err.sum()) / n_all
        if config.early_stop and total >= best_total:
            break
        best_total = min(best_total, total)
        T = xg - shrink_lp(xg - W_r, beta, config.lp_norm)  # target for s·(W_q − z)
        s, z = _refit(W_q, T, s, z, valid, n, fit_zero, fit_scale)
        beta *= config.kappa
    return best_s, best_z


def _refit(W_q: torch.Tensor, T: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
           valid: torch.Tensor, n: torch.Tensor, fit_zero: bool,
           fit_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares ``min ‖s·(W_q − z) − T‖²`` per group over the free parameters."""
    if not fit_scale:  # HQQ's step: z = mean(W_q − T/s)
        return s, _group_mean(W_q - T / s, valid, n)
    if not fit_zero:   # s = <W_q − z, T> / ‖W_q − z‖²
        d = (W_q - z) * valid
        den = (d * d).sum(-1, keepdim=True)
        s_new = (d * T).sum(-1, keepdim=True) / den.clamp(min=1e-30)
        return torch.where((den > 0) & (s_new > 0), s_new, s), z
    # T ≈ a·W_q + b  with a = s, b = −s·z
    mq, mt = _group_mean(W_q, valid, n), _group_mean(T, valid, n)
    cov = _group_mean((W_q - mq) * (T - mt), valid, n)
    var = _group_mean((W_q - mq) ** 2, valid, n)
    a = cov / var.clamp(min=1e-30)
    ok = (var > 0) & (a > 0)
    s_new = torch.where(ok, a, s)
    z_new = torch.where(ok, (a * mq - mt) / s_new, _group_mean(W_q - T / s, valid, n))
    return s_new, z_new


def _valid_mask(W: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """1.0 where the grouped view holds a real weight, 0.0 on a ragged group's padding."""
    rows = W.shape[0] if scheme.granularity == "tensor" else 1
    return group(torch.ones(rows, W.shape[1], device=W.device), scheme)  # (1, G, g)


def hqq_params(W: torch.Tensor, scheme: QuantScheme | str,
               config: HQQConfig | None = None) -> tuple[torch.Tensor, Params, torch.Tensor]:
    """HQQ's optimized parameters with **float** zero-points (what the reference stores).

    Returns:
        ``(xg, params, valid)``: the grouped weights (R', G, g), ``{"scales", "zeros"}``
        (R', G, 1) float32 — scales in the storage dtype, zeros unrounded (absent for
        symmetric schemes) — and the padding mask (1 or R', G, g).
    """
    cfg = config or HQQConfig()
    scheme = QuantScheme.parse(scheme)
    if scheme.format != "int":
        raise SchemeError(f"hqq optimizes integer grids (w2–w8), not {scheme.format}")
    check_weight(W)
    xg = group(W.detach().to(torch.float32), scheme)
    valid = _valid_mask(W, scheme)
    init = qparams_from_range(xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True), scheme)
    s = init["scales"]
    if scheme.symmetric:  # the zero-point is fixed: the scale is the only free parameter
        z = torch.full_like(s, float(1 << (scheme.bits - 1)))
        s, _ = hqq_optimize(xg, s, z, scheme.bits, cfg, valid, fit_zero=False, fit_scale=True)
        return xg, {"scales": _storage_scale(s, scheme)}, valid
    s, z = hqq_optimize(xg, s, init["zeros"], scheme.bits, cfg, valid,
                        fit_scale=cfg.optimize_scale)
    if cfg.optimize_scale:
        s = _storage_scale(s, scheme)
    return xg, {"scales": s, "zeros": z}, valid


def _storage_scale(s: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """A fitted step at its nearest storage value (rounded up instead if that would be 0)."""
    r = s.to(TORCH_DTYPES[scheme.scale_dtype]).to(torch.float32)
    r = torch.where(r > 0, r, round_scale_up(s, scheme.scale_dtype))
    if not torch.isfinite(r).all():
        raise SchemeError(f"weights too large for {scheme.scale_dtype} scales; use -fp32")
    return r


def round_zeros(xg: torch.Tensor, params: Params, bits: int, valid: torch.Tensor,
                lp_norm: float) -> Params:
    """Integer zero-points: per group the better of floor(z) and ceil(z) by Σ|W − W_r|^p."""
    maxq = (1 << bits) - 1
    s, z = params["scales"], params["zeros"]
    best_z, best_err = None, None
    for cand in (torch.floor(z), torch.ceil(z)):
        cand = cand.clamp(0, maxq)
        err = ((xg - s * (_codes(xg, s, cand, maxq) - cand)).abs().pow(lp_norm) * valid) \
            .sum(-1, keepdim=True)
        if best_z is None or best_err is None:
            best_z, best_err = cand, err
        else:
            best_z = torch.where(err < best_err, cand, best_z)
            best_err = torch.minimum(err, best_err)
    assert best_z is not None
    return {"scales": s, "zeros": best_z}


def dequantize_float_zero(W: torch.Tensor, scheme: QuantScheme | str,
                          config: HQQConfig | None = None) -> torch.Tensor:
    """``W_r`` with HQQ's unrounded zero-points (for measuring; not storable as ``int``)."""
    scheme = QuantScheme.parse(scheme)
    xg, p, _ = hqq_params(W, scheme, config)
    z = p.get("zeros", torch.full_like(p["scales"], float(1 << (scheme.bits - 1))))
    W_r = p["scales"] * (_codes(xg, p["scales"], z, (1 << scheme.bits) - 1) - z)
    return ungroup(W_r, tuple(W.shape))  # type: ignore[arg-type]


def hqq_quantize(W: torch.Tensor, scheme: QuantScheme | str,
                 config: HQQConfig | None = None) -> QuantizedTensor:
    """HQQ-quantize a 2-D weight into a standard ``int`` ``QuantizedTensor``.

    Asymmetric schemes: :func:`hqq_params` (float zero-points), then each zero-point rounded to
    the better integer neighbour (:func:`round_zeros`), then — with ``optimize_scale`` — the
    scale refitted by the same proximal iterations with that integer zero-point fixed.
    Symmetric schemes: the refitted scale of :func:`hqq_params`.

    Args:
        W: weight (R, C); not modified.
        scheme: an integer scheme, e.g. ``w4g64-asym`` (HQQ's home) or ``w4g128``.
        config: options; default :class:`HQQConfig()`.

    Example:
        >>> qt = hqq_quantize(linear.weight, "w4g64-asym")   # doctest: +SKIP
    """
    cfg = config or HQQConfig()
    scheme = QuantScheme.parse(scheme)
    xg, params, valid = hqq_params(W, scheme, cfg)
    if scheme.float_zero:  # HQQ's own storage: the optimized zero-point, kept as a float
        params["zeros"] = round_zero(params["zeros"], scheme)
    elif not scheme.symmetric:
        params = round_zeros(xg, params, scheme.bits, valid, cfg.lp_norm)
        if cfg.optimize_scale:
            s, _ = hqq_optimize(xg, params["scales"], params["zeros"], scheme.bits, cfg, valid,
                                fit_zero=False, fit_scale=True)
            params["scales"] = _storage_scale(s, scheme)
    codes = get_format("int").encode(xg, params, scheme)
    return QuantizedTensor.from_codes(codes.cpu(), {k: v.cpu() for k, v in params.items()},
                                      scheme, tuple(W.shape))  # type: ignore[arg-type]


def quantize_weight(w: torch.Tensor, scheme: QuantScheme, stats: dict[str, torch.Tensor],
                    config: HQQConfig | None = None) -> QuantizedTensor:
    return hqq_quantize(w, scheme, config)


register(Quantizer(
    "hqq", quantize_weight, HQQConfig,
    description="HQQ: half-quadratic zero-point optimization, no calibration data"))
