"""Histogram observer: a fixed number of bins per channel, growing with the data's range;
the range is read off as a percentile or by TensorRT's entropy (KL-divergence) calibration.

Symmetric histograms count ``|x|`` on ``[0, amax]``; asymmetric ones count ``x`` on
``[min, max]``. When a batch falls outside the current range, the range grows to cover it and
the old counts are redistributed over the new bins by linear interpolation of their
cumulative counts (so a histogram over many batches is a slightly smoothed version of the
one-shot histogram; counts are conserved exactly).

Entropy calibration (Migacz, "8-bit inference with TensorRT", 2017; MXNet's
``_get_optimal_threshold``), symmetric only, with L = 2^(bits−1) target levels:

    for i in L … bins:
        P = hist[:i], with every count beyond bin i added to its last bin   (clip outliers)
        Q = hist[:i] merged into L equal chunks, each chunk's count spread evenly
            over its non-empty bins                                     (what b bits keep)
        KL(P ‖ Q) with both normalized (Q's empty bins smoothed by ε = 1e-4)
    threshold = upper edge of bin i with the smallest KL

It costs one pass over the histogram per candidate: fine per tensor, slow per channel for
thousands of channels.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..errors import SchemeError
from .base import Observer

KL_EPS = 1e-4


def interp_rows(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise ``numpy.interp``: ``xp`` (K, m) increasing, ``fp`` (K, m), ``x`` (K, n)."""
    idx = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, xp.shape[1] - 1)
    x0, x1 = xp.gather(1, idx - 1), xp.gather(1, idx)
    f0, f1 = fp.gather(1, idx - 1), fp.gather(1, idx)
    w = ((x - x0) / (x1 - x0).clamp(min=torch.finfo(x.dtype).tiny)).clamp(0, 1)
    return f0 + w * (f1 - f0)


class HistogramObserver(Observer):
    """Histogram of the values (per channel along ``axis``) with range selection.

    Args:
        axis: channel dimension, or None for one histogram.
        bins: bins per histogram (TensorRT uses 2048).
        method: ``"percentile"`` or ``"entropy"`` (symmetric only).
        percentile: for ``"percentile"``; two-sided when asymmetric.
        bits: target width for ``"entropy"`` (8 → 128 levels of |x|).
        symmetric: histogram of |x| and a range ``(−t, t)``, or of x and ``(lo, hi)``.
    """

    def __init__(self, axis: int | None = None, bins: int = 2048,
                 method: Literal["percentile", "entropy"] = "entropy",
                 percentile: float = 99.99, bits: int = 8, symmetric: bool = True) -> None:
        super().__init__(axis)
        if method not in ("percentile", "entropy"):
            raise SchemeError(f"histogram method must be percentile or entropy, not {method!r}")
        if method == "entropy" and not symmetric:
            raise SchemeError("entropy calibration is defined on |x| (symmetric ranges)")
        if not 2 <= bits <= 16 or bins < (1 << (bits - 1)):
            raise SchemeError(f"need 2 <= bits <= 16 and bins >= 2^(bits-1); got bits={bits}, "
                              f"bins={bins}")
        if not 50 < percentile <= 100:
            raise SchemeError(f"percentile must be in (50, 100], not {percentile}")
        self.bins, self.method, self.percentile = bins, method, percentile
        self.bits, self.symmetric = bits, symmetric
        self.hist: torch.Tensor | None = None   # (K, bins) float64 counts
        self.lo: torch.Tensor | None = None     # (K,) histogram range
        self.hi: torch.Tensor | None = None

    # ---------------------------------------------------------------------- accumulate
    def _observe(self, rows: torch.Tensor) -> None:
        if self.symmetric:
            rows = rows.abs()
        b_lo = torch.zeros(rows.shape[0], device=rows.device) if self.symmetric \
            else rows.amin(1)
        b_hi = rows.amax(1)
        if self.hist is None or self.lo is None or self.hi is None:
            lo, hi = b_lo, b_hi
            self.hist = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64,
                                    device=rows.device)
        else:
            lo, hi = torch.minimum(self.lo, b_lo), torch.maximum(self.hi, b_hi)
            if bool((lo < self.lo).any() or (hi > self.hi).any()):
                self.hist = self._rebin(lo, _widen(lo, hi))
        hi = _widen(lo, hi)
        self.lo, self.hi = lo, hi
        self.hist += self._counts(rows, lo, hi)

    def _counts(self, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        K = rows.shape[0]
        width = (hi - lo)[:, None] / self.bins
        idx = ((rows - lo[:, None]) / width).floor().clamp(0, self.bins - 1).long()
        flat = idx + torch.arange(K, device=rows.device)[:, None] * self.bins
        return torch.bincount(flat.reshape(-1), minlength=K * self.bins) \
            .view(K, self.bins).to(torch.float64)

    def _rebin(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """The current counts on new, wider bins (cumulative counts interpolated)."""
        assert self.hist is not None
        old = self.edges().double()                                     # (K, bins+1)
        cum = torch.cat([torch.zeros_like(self.hist[:, :1]), self.hist.cumsum(1)], dim=1)
        t = torch.linspace(0, 1, self.bins + 1, dtype=torch.float64, device=lo.device)
        new = lo.double()[:, None] + t * (hi - lo).double()[:, None]
        ncum = interp_rows(new, old, cum)
        ncum[:, 0], ncum[:, -1] = 0, cum[:, -1]  # everything lies inside the new range
        return ncum.diff(dim=1).clamp(min=0)

    def edges(self) -> torch.Tensor:
        """Bin edges (K, bins + 1), float32."""
        assert self.lo is not None and self.hi is not None
        t = torch.linspace(0, 1, self.bins + 1, device=self.lo.device)
        return self.lo[:, None] + t * (self.hi - self.lo)[:, None]

    # ------------------------------------------------------------------------- ranges
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.hist is not None
        if self.method == "entropy":
            t = self.edges().gather(1, entropy_threshold_bins(self.hist, 1 << (self.bits - 1))
                                    [:, None]).squeeze(1)
            return -t, t
        q = self.percentile / 100
        if self.symmetric:
            t = self._quantile(q)
            return -t, t
        return self._quantile(1 - q), self._quantile(q)

    def _quantile(self, q: float) -> torch.Tensor:
        assert self.hist is not None
        cum = torch.cat([torch.zeros_like(self.hist[:, :1]), self.hist.cumsum(1)], dim=1)
        target = q * cum[:, -1:]
        # first edge where the cumulative count reaches the target, interpolated in its bin
        return interp_rows(target, cum, self.edges().double()).squeeze(1).float()


def entropy_threshold_bins(hist: torch.Tensor, levels: int) -> torch.Tensor:
    """For each row of ``hist`` (K, B) of |x|, the bin count i ∈ [levels, B] whose threshold
    (upper edge of bin i − 1, i.e. edge index i) minimizes KL(P ‖ Q), see the module docstring.
    """
    K, B = hist.shape
    best_kl = torch.full((K,), float("inf"), dtype=torch.float64, device=hist.device)
    best_i = torch.full((K,), B, dtype=torch.long, device=hist.device)
    tail = hist.flip(1).cumsum(1).flip(1)  # tail[:, i] = Σ hist[:, i:]
    for i in range(levels, B + 1):
        h = hist[:, :i]
        P = h.clone()
        if i < B:
            P[:, -1] += tail[:, i]
        kl = _kl(P, _expanded(h, levels))
        better = kl < best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    return best_i


def _expanded(h: torch.Tensor, levels: int) -> torch.Tensor:
    """``h`` (K, i) merged into ``levels`` chunks, spread back evenly over non-empty bins."""
    i = h.shape[1]
    merged = i // levels
    chunk = (torch.arange(i, device=h.device) // merged).clamp(max=levels - 1)  # last absorbs
    nz = (h > 0).to(h.dtype)
    sums = torch.zeros(h.shape[0], levels, dtype=h.dtype, device=h.device).index_add_(1, chunk, h)
    cnt = torch.zeros_like(sums).index_add_(1, chunk, nz)
    return nz * (sums / cnt.clamp(min=1))[:, chunk]


def _kl(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row after normalizing; Q's empty bins get ε (taken from its others)."""
    p = P / P.sum(1, keepdim=True).clamp(min=1e-300)
    q = Q / Q.sum(1, keepdim=True).clamp(min=1e-300)
    zero = q == 0
    n_zero = zero.sum(1, keepdim=True)
    n_nz = (~zero).sum(1, keepdim=True).clamp(min=1)
    q = torch.where(zero, torch.full_like(q, KL_EPS), q - KL_EPS * n_zero / n_nz)
    q = q.clamp(min=1e-300)
    terms = torch.where(p > 0, p * (p.clamp(min=1e-300) / q).log(), torch.zeros_like(p))
    return terms.sum(1)


def _widen(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``hi`` nudged above ``lo`` where a channel is constant, so bins have positive width."""
    tiny = torch.maximum(lo.abs() * 1e-6, torch.full_like(lo, 1e-12))
    return torch.where(hi > lo, hi, lo + tiny)
