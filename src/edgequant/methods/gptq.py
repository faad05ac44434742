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

One solver, many formats: :func:`gptq_solve` takes an *encoder* (:mod:`.gptq_encoders`)
that says how wide a group is and how to round — column by column (native schemes, below), or
a whole group of columns at once, the group's error ``E`` then fed forward in block form
``W_R −= E·U_BB⁻¹·U_BR`` (GGML blocks, :mod:`.gptq_ggml`, for ``export(..., gptq=True)``).
Damping, dead inputs, act-order, lazy batches and the report are shared, so an improvement to
any of them reaches native artifacts and GGUF files alike.

Native formats: everything goes through the ``NumberFormat`` interface (``params`` on a group of
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
from ..formats import QuantizedTensor, QuantScheme
from ..formats.tensor import check_weight
from .gptq_encoders import (
    MSE_GRID,
    MSE_MAX_SHRINK,
    MSE_NORM,
    ColumnEncoder,
    Encoder,
    GroupEncoder,
    NativeEncoder,
    ResultT,
    search_params,
)
from .registry import Quantizer, register

__all__ = ["MSE_GRID", "MSE_MAX_SHRINK", "MSE_NORM", "ColumnEncoder", "DampingRaised",
           "Encoder", "GPTQConfig", "GPTQReport", "GroupEncoder", "HessianError",
           "NativeEncoder", "gptq_quantize", "gptq_quantize_report", "gptq_solve",
           "inverse_hessian_factor", "search_params"]


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


# ----------------------------------------------------------------------------- solver
def gptq_solve(W: torch.Tensor, H: torch.Tensor, encoder: Encoder[ResultT],
               config: GPTQConfig | None = None) -> tuple[ResultT, GPTQReport]:
    """GPTQ with any encoder: the one solver behind native schemes and GGML blocks.

    Shared by every format: dead inputs, damping and the float64 factorization
    (:func:`inverse_hessian_factor`), act-order, lazy batches and the report. The encoder says
    how wide a group is and rounds either column by column (:class:`ColumnEncoder`) or a whole
    group at once (:class:`GroupEncoder`, error fed forward as ``W_R −= E·U_BB⁻¹·U_BR``).

    Args:
        W: weight (R, C) = (out_features, in_features), any float dtype; not modified.
        H: Hessian (C, C) of the layer's inputs, ``(2/n)·Σ XᵀX`` or any positive multiple
            (a float64 ``H`` is factorized without a detour through float32); not modified.
        encoder: a fresh encoder for this weight.
        config: options; default :class:`GPTQConfig()`.

    Returns:
        ``(encoder.finish(), GPTQReport)``.

    Raises:
        HessianError: ``H`` cannot be made positive definite within ``config.damp_max``.
        SchemeError / WeightError: options the encoder refuses, bad shapes, non-finite weights.
    """
    tick = time.perf_counter()
    cfg = config or GPTQConfig()
    encoder.check(cfg)
    check_weight(W)
    R, C = W.shape
    if tuple(H.shape) != (C, C):
        raise SchemeError(f"Hessian shape {tuple(H.shape)} does not match the weight's "
                          f"{C} input columns")
    W = W.detach().to(torch.float32).clone()
    hdtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    H = H.detach().to(device=W.device, dtype=hdtype).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if cfg.act_order else None
    encoder.begin(W, perm)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_hessian_factor(H, cfg.damp, cfg.damp_max)
    del H
    if damp > cfg.damp:
        warnings.warn(DampingRaised(f"gptq: Hessian not positive definite with damp "
                                    f"{cfg.damp:g}; used {damp:g}", cfg.damp, damp),
                      stacklevel=3)
    loss = _solve(W, U, encoder, cfg.block_size)
    report = GPTQReport(cfg.damp, damp, int(dead.sum()), loss, time.perf_counter() - tick)
    return encoder.finish(), report


def _solve(W: torch.Tensor, U: torch.Tensor, encoder: Encoder[ResultT], block_size: int
           ) -> float:
    """The GPTQ loop over (permuted) columns in lazy blocks; ``W`` is updated in place.
    Returns the proxy loss ½·Σ err² (err = E·U_BB⁻¹, one column or one group at a time)."""
    C = W.shape[1]
    g = encoder.group_width(C)
    block = encoder.lazy_block(block_size, C)
    if isinstance(encoder, GroupEncoder) and block % g:
        raise SchemeError(f"lazy block {block} is not a whole number of groups of {g}")
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        if isinstance(encoder, ColumnEncoder):
            Err1 = _round_columns(W, U, encoder, i1, i2, g)
        else:
            assert isinstance(encoder, GroupEncoder)
            Err1 = _round_groups(W, U, encoder, i1, i2, g)
        W[:, i2:].addmm_(Err1, U[i1:i2, i2:], alpha=-1)
        loss += Err1.double().pow(2).sum() / 2
    return float(loss)


def _round_columns(W: torch.Tensor, U: torch.Tensor, encoder: ColumnEncoder[ResultT],
                   i1: int, i2: int, g: int) -> torch.Tensor:
    """One lazy block, column by column (the paper's loop). Returns Err1 (R, B)."""
    W1 = W[:, i1:i2].clone()            # (R, B)
    Err1 = torch.zeros_like(W1)         # (R, B)
    U1 = U[i1:i2, i1:i2]                # (B, B)
    for i in range(i2 - i1):
        j = i1 + i
        if j % g == 0:  # a group starts: the encoder may pick parameters from updated weights
            encoder.start_group(W1[:, i:i + g], j)
        w = W1[:, i]                                                # (R,)
        q = encoder.round_column(w, j)                              # (R,)
        err = (w - q) / U1[i, i]
        W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
        Err1[:, i] = err
    return Err1


def _round_groups(W: torch.Tensor, U: torch.Tensor, encoder: GroupEncoder[ResultT],
                  i1: int, i2: int, g: int) -> torch.Tensor:
    """One lazy block, a group at a time, updating ``W[:, :i2]`` in place: fixing group B
    with error E = W_B − Q_B moves the later columns by −E·U_BB⁻¹·U_BR (for one column the
    paper's err/U_jj·U_j,R). Returns Err1 = [E·U_BB⁻¹ …] (R, B)."""
    Err1 = W.new_zeros(W.shape[0], i2 - i1)                         # (R, B)
    for j0 in range(i1, i2, g):
        j1 = min(j0 + g, i2)
        Q = encoder.round_group(W, j0, j1)                          # (R, g)
        E = W[:, j0:j1] - Q
        Err = torch.linalg.solve_triangular(U[j0:j1, j0:j1], E, upper=True, left=False)
        W[:, j1:i2].addmm_(Err, U[j0:j1, j1:i2], alpha=-1)
        Err1[:, j0 - i1:j1 - i1] = Err
    return Err1


# ----------------------------------------------------------------------------- native
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme | str,
                  config: GPTQConfig | None = None) -> QuantizedTensor:
    """GPTQ-quantize one weight: :func:`gptq_quantize_report` without the report (a
    :class:`DampingRaised` warning still says when damping had to be raised)."""
    return gptq_quantize_report(W, H, scheme, config)[0]


def gptq_quantize_report(W: torch.Tensor, H: torch.Tensor, scheme: QuantScheme | str,
                         config: GPTQConfig | None = None
                         ) -> tuple[QuantizedTensor, GPTQReport]:
    """GPTQ-quantize a linear layer's weight to a native scheme.

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
    cfg = config or GPTQConfig()
    encoder = NativeEncoder(scheme, mse_clip=cfg.mse_clip, static_groups=cfg.static_groups)
    return gptq_solve(W, H, encoder, cfg)


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
