"""GPTQ (Frantar et al., 2022): quantize columns one at a time, pushing each column's error onto
the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction loss.

For a linear layer with inputs ``X`` (n tokens, C inputs) the loss ‖XWᵀ − XŴᵀ‖² has Hessian
``H = (2/n)·XᵀX`` (C, C), the same for every output row. With ``U`` the upper Cholesky factor
of ``H⁻¹`` (so ``H⁻¹ = UᵀU``), quantizing column ``j`` to ``q`` and updating the later columns by

    err = (w_j − q_j) / U[j, j]            # (R,)
    W[:, j:] −= err ⊗ U[j, j:]             # optimal compensation (OBS), exact in this order

minimizes the loss one column at a time. Lazy batches apply the update inside a block of
``block_size`` columns immediately and to the rest of the matrix once per block (one GEMM).

Faithful to the reference (IST-DASLab/gptq) in: dead inputs (``H_jj = 0`` → ``H_jj = 1``,
``W[:, j] = 0``); damping ``damp · mean(diag H)`` on the diagonal; act-order by descending
``diag(H)`` (after the dead-input fix, before damping); group parameters computed when a group
starts, from the error-updated weights, or up front from the original weights with
``static_groups``; the optional ``mse`` clip search (shrink grid 1, 0.99, …, 0.21, norm 2.4).

Where we differ, and why:

* The Cholesky factorizations run in **float64** (then ``U`` is cast to float32 for the
  column loop, which is float32 as in the reference): a fraction of a second on CPU for 1536
  inputs, and nearly singular Hessians from short calibration sets factor reliably.
* If a factorization fails, damping is raised ×10 at a time up to ``damp_max``; the damping
  used is returned in :class:`GPTQReport` and announced with a :class:`DampingRaised` warning.
  Past ``damp_max`` a :class:`HessianError` says what to do. The reference just crashes.
* With dynamic groups the lazy blocks are aligned to groups (``block_size`` rounded to a
  multiple of ``group_size``), so a group's parameters always see every earlier column's
  update. The reference reads partially stale weights when a group starts inside a block
  (e.g. group 32, block 128); with its defaults (group = block = 128) the two are identical.
* A ragged last group (576 columns, group 128) gets its parameters from its 64 real columns.

Formats: everything goes through the ``NumberFormat`` interface (``params`` on a group of
columns, ``encode``/``decode`` on one column with that group's parameters), so ``int``
(2–8 bits, symmetric or asymmetric), ``nf4``/``fp4`` (absmax codebooks), ``fp4_e2m1`` and
``fp8`` scales all work, at tensor, channel or group granularity. Double-quantized scales
(``nf4-dq``) are a whole-tensor transform, so they need parameters computed once up front:
channel/tensor granularity, or ``static_groups=True``, and no ``mse_clip``. ``binary``/
``ternary`` run too, but their scale is a mean, not a range, so GPTQ's premise (a fixed grid
per group) holds only loosely for them (tests check only that they beat RTN on one layer).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from ..errors import EdgequantError, SchemeError
from ..formats import NumberFormat, QuantizedTensor, QuantScheme, get_format
from ..formats.base import group
from ..formats.tensor import check_weight
from .registry import Quantizer, register

Params = dict[str, torch.Tensor]

# the reference's ``mse`` search: shrink factors 1, 0.99, …, 0.21 of the range, norm 2.4
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


class HessianError(EdgequantError):
    """A Hessian that cannot be factorized even with the largest damping allowed."""


class DampingRaised(UserWarning):
    """The Hessian needed more damping than asked for; ``used`` is the fraction applied."""

    def __init__(self, message: str, requested: float, used: float) -> None:
        super().__init__(message)
        self.requested = requested
        self.used = used


@dataclass(frozen=True)
class GPTQConfig:
    """Options of the ``gptq`` method.

    Attributes:
        damp: damping added to the Hessian's diagonal, as a fraction of its mean diagonal.
        block_size: columns per lazy batch (results do not depend on it, only speed).
        act_order: quantize columns by descending ``diag(H)`` (stores ``g_idx`` with groups).
        static_groups: group parameters from the original weights, before any update (with
            act-order this keeps groups contiguous, so no ``g_idx`` is stored).
        mse_clip: per group, pick the range shrink factor minimizing ‖w − ŵ‖^2.4.
        damp_max: the largest damping fraction tried when the Cholesky factorization fails.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    mse_clip: bool = False
    damp_max: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.damp <= self.damp_max:
            raise SchemeError(f"gptq damp must be in [0, damp_max={self.damp_max}], "
                              f"not {self.damp}")
        if self.block_size < 1:
            raise SchemeError(f"gptq block_size must be positive, not {self.block_size}")


@dataclass(frozen=True)
class GPTQReport:
    """What one GPTQ call did, for the pipeline to log.

    Attributes:
        damp_requested: ``config.damp``.
        damp: the damping fraction actually used (larger if the factorization failed).
        dead_columns: inputs whose Hessian diagonal was zero (quantized as zeros).
        loss: the GPTQ proxy loss ½·Σ (w − q)² / U_jj², the reference's ``error``.
        seconds: wall time of the call.
    """

    damp_requested: float
    damp: float
    dead_columns: int
    loss: float
    seconds: float

    @property
    def damp_raised(self) -> bool:
        return self.damp > self.damp_requested


# ------------------------------------------------------------------------------ Hessian
def inverse_hessian_factor(H: torch.Tensor, damp: float,
                           damp_max: float = 1.0) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    Factorizes in float64; on failure multiplies ``damp`` by 10 (0 becomes 1e-3) until it
    exceeds ``damp_max``. ``H`` is not modified.

    Returns:
        ``(U, damp_used)`` with ``U`` float32 (C, C) upper triangular.

    Raises:
        HessianError: non-finite ``H``, a non-positive mean diagonal, or no damping up to
            ``damp_max`` makes it positive definite.
    """
    H64 = H.to(torch.float64)
    if not torch.isfinite(H64).all():
        raise HessianError("the Hessian has NaN/Inf entries; check the calibration activations")
    mean_diag = float(H64.diagonal().mean())
    if mean_diag <= 0:
        raise HessianError(f"the Hessian's mean diagonal is {mean_diag:.3g} (must be > 0); "
                           f"it is not a valid 2/n·XᵀX")
    eye = torch.eye(H64.shape[0], dtype=torch.float64, device=H64.device)
    frac = damp
    while True:
        L, info = torch.linalg.cholesky_ex(H64 + frac * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U.to(torch.float32), frac
        nxt = frac * 10 if frac > 0 else 1e-3
        if nxt > damp_max * (1 + 1e-9):
            raise HessianError(f"the Hessian is not positive definite even with damping "
                               f"{frac:g}·mean(diag H); use more calibration data, or raise "
                               f"damp_max (now {damp_max:g})")
        frac = nxt


# --------------------------------------------------------------------------- parameters
def search_params(fmt: NumberFormat, xg: torch.Tensor, scheme: QuantScheme,
                  grid: int = MSE_GRID, max_shrink: float = MSE_MAX_SHRINK,
                  norm: float = MSE_NORM) -> Params:
    """Per group, the parameters of the shrunk range ``p·x`` (p = 1, 1 − 1/grid, …) that
    minimize ``Σ|x − x̂|^norm`` — the reference's ``mse`` option, for any format whose
    parameters scale with the data (range- and absmax-based ones).

    Args:
        xg: grouped view (R, G, g).
    Returns:
        parameters (R, G, 1) as ``fmt.params`` gives them.
    """
    best: Params = fmt.params(xg, scheme)
    best_err = _lp_error(fmt, xg, best, scheme, norm)
    for i in range(1, int(max_shrink * grid)):
        cand = fmt.params(xg * (1 - i / grid), scheme)
        err = _lp_error(fmt, xg, cand, scheme, norm)
        better = err < best_err
        best = {k: torch.where(better, cand[k], v) for k, v in best.items()}
        best_err = torch.where(better, err, best_err)
    return best


def _lp_error(fmt: NumberFormat, xg: torch.Tensor, params: Params, scheme: QuantScheme,
              norm: float) -> torch.Tensor:
    x_hat = fmt.decode(fmt.encode(xg, params, scheme), params, scheme)
    return (x_hat - xg).abs().pow(norm).sum(-1, keepdim=True)  # (R, G, 1)


def _params(fmt: NumberFormat, xg: torch.Tensor, scheme: QuantScheme, mse_clip: bool) -> Params:
    return search_params(fmt, xg, scheme) if mse_clip else fmt.params(xg, scheme)


# ----------------------------------------------------------------------------- driver
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme | str,
                  config: GPTQConfig | None = None) -> QuantizedTensor:
    """GPTQ-quantize one weight: :func:`gptq_quantize_report` without the report (a
    :class:`DampingRaised` warning still says when damping had to be raised)."""
    return gptq_quantize_report(W, H, scheme, config)[0]


def gptq_quantize_report(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme | str,
                         config: GPTQConfig | None = None
                         ) -> tuple[QuantizedTensor, GPTQReport]:
    """GPTQ-quantize a linear layer's weight.

    Args:
        W: weight (R, C) = (out_features, in_features), any float dtype; not modified.
        H: Hessian (C, C) of the layer's inputs, ``(2/n)·Σ XᵀX``; not modified.
        scheme: quantization scheme (or its short name, e.g. ``w4g128``).
        config: options; default :class:`GPTQConfig()`.

    Returns:
        ``(QuantizedTensor, GPTQReport)``. With ``act_order`` and dynamic groups the tensor
        has ``g_idx`` (the group of each original column); codes are in column order.

    Raises:
        HessianError: ``H`` cannot be made positive definite within ``config.damp_max``.
        SchemeError / WeightError: a bad scheme, shape or non-finite weight.

    Example:
        >>> qt, rep = gptq_quantize_report(linear.weight, H, "w4g128")   # doctest: +SKIP
        >>> y = x @ qt.dequantize().T
    """
    tick = time.perf_counter()
    cfg = config or GPTQConfig()
    scheme = QuantScheme.parse(scheme)
    check_weight(W)
    R, C = W.shape
    if tuple(H.shape) != (C, C):
        raise SchemeError(f"Hessian shape {tuple(H.shape)} does not match the weight's "
                          f"{C} input columns")
    dynamic = scheme.granularity == "group" and not cfg.static_groups
    if scheme.double_quant and (dynamic or cfg.mse_clip):
        raise SchemeError("double-quantized scales are computed over the whole tensor: use "
                          "gptq with static_groups=True and mse_clip=False for this scheme")
    fmt = get_format(scheme.format)

    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    fixed = None if dynamic else _params(fmt, group(W, scheme), scheme, cfg.mse_clip)
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if cfg.act_order \
        else torch.arange(C, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_hessian_factor(H, cfg.damp, cfg.damp_max)
    del H
    if damp > cfg.damp:
        warnings.warn(DampingRaised(f"gptq: Hessian not positive definite with damp "
                                    f"{cfg.damp:g}; used {damp:g}", cfg.damp, damp),
                      stacklevel=3)

    codes, params, loss = _quantize_columns(W, U, fmt, scheme, cfg, perm, fixed)
    invperm = torch.argsort(perm)
    codes = codes[:, invperm]  # (R, C) in original column order
    g_idx = None
    if dynamic and cfg.act_order:  # group of original column perm[j] is j // group_size
        g_idx = (torch.arange(C, device=W.device) // (scheme.group_size or C))[invperm]
    qt = QuantizedTensor.from_codes(codes.cpu(), {k: v.cpu() for k, v in params.items()},
                                    scheme, (R, C), None if g_idx is None else g_idx.cpu())
    report = GPTQReport(cfg.damp, damp, int(dead.sum()), loss, time.perf_counter() - tick)
    return qt, report


def _quantize_columns(W: torch.Tensor, U: torch.Tensor, fmt: NumberFormat, scheme: QuantScheme,
                      cfg: GPTQConfig, perm: torch.Tensor, fixed: Params | None
                      ) -> tuple[torch.Tensor, Params, float]:
    """The GPTQ loop over (permuted) columns, with lazy batch updates. ``W`` is updated in place.

    Returns codes (R, C) in permuted order, parameters (R', G, 1) and the proxy loss.
    """
    R, C = W.shape
    g = scheme.group_size or C
    dynamic = fixed is None
    block = g * max(1, cfg.block_size // g) if dynamic else cfg.block_size
    codes = torch.empty(R, C, dtype=torch.uint8, device=W.device)
    groups: list[Params] = []  # dynamic groups, in (permuted) order
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1 = W[:, i1:i2].clone()            # (R, B)
        Err1 = torch.zeros_like(W1)         # (R, B)
        U1 = U[i1:i2, i1:i2]                # (B, B)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % g == 0:  # a group starts: parameters from updated weights
                groups.append(_params(fmt, W1[:, i:i + g].unsqueeze(1), scheme, cfg.mse_clip))
            p = groups[-1] if dynamic else _column_params(fixed, scheme, int(perm[j]), g)
            w = W1[:, i]                                            # (R,)
            c = fmt.encode(w.view(R, 1, 1), p, scheme)              # (R, 1, 1)
            q = fmt.decode(c, p, scheme).view(R)
            codes[:, j] = c.view(R)
            d = U1[i, i]
            err = (w - q) / d
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
        loss += Err1.double().pow(2).sum() / 2
    if dynamic:
        params = {k: torch.cat([p[k] for p in groups], dim=1) for k in groups[0]}
    else:
        assert fixed is not None
        params = fixed
    return codes, params, float(loss)


def _column_params(fixed: Params | None, scheme: QuantScheme, col: int, g: int) -> Params:
    """Parameters for original column ``col`` from up-front (R', G, 1) parameters."""
    assert fixed is not None
    if scheme.granularity != "group":
        return fixed  # (R, 1, 1) or (1, 1, 1): broadcast over the column
    k = col // g
    return {name: v[:, k:k + 1] for name, v in fixed.items()}


# ----------------------------------------------------------------------------- method
def quantize_weight(w: torch.Tensor, scheme: QuantScheme, stats: dict[str, torch.Tensor],
                    config: GPTQConfig | None = None) -> QuantizedTensor:
    if "hessian" not in stats:
        raise EdgequantError("gptq needs stats['hessian'] (2/n·XᵀX of the layer's inputs); "
                             "run it through the pipeline with calibration data")
    return gptq_quantize(w, stats["hessian"], scheme, config)


register(Quantizer(
    "gptq", quantize_weight, GPTQConfig, needs=frozenset({"hessian"}),
    description="GPTQ: column-by-column rounding with inverse-Hessian error feedback"))
