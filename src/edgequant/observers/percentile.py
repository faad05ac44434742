"""Percentile ranges from a uniform sample of the values (exact while they fit)."""

from __future__ import annotations

import torch

from ..errors import SchemeError
from .base import Observer, SampleStore


def row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile ``q`` ∈ [0, 1] of each row of ``rows`` (K, M) → (K,).

    Same definition as ``torch.quantile``/``numpy.percentile`` (default "linear"), without
    ``torch.quantile``'s 2^24-element limit.
    """
    m = rows.shape[1]
    pos = q * (m - 1)
    i = min(int(pos), m - 1)
    a = torch.kthvalue(rows, i + 1, dim=1).values          # (K,) the i-th smallest
    if i + 1 >= m or pos == i:
        return a
    b = torch.kthvalue(rows, i + 2, dim=1).values
    return a + (pos - i) * (b - a)


class PercentileObserver(Observer):
    """Clip at a percentile instead of the extremes.

    Symmetric: ``(−t, t)`` with t the ``percentile`` of ``|x|``. Asymmetric: ``lo`` at
    ``100 − percentile`` and ``hi`` at ``percentile`` of ``x``. Values are kept in a
    :class:`SampleStore` (all of them up to ``max_samples`` per channel), so the answer is
    exact for a weight and a uniform-sample estimate for long activation streams.
    """

    def __init__(self, axis: int | None = None, percentile: float = 99.99,
                 symmetric: bool = True, max_samples: int = 1 << 20, seed: int = 0) -> None:
        super().__init__(axis)
        if not 50 < percentile <= 100:
            raise SchemeError(f"percentile must be in (50, 100], not {percentile}")
        self.percentile = percentile
        self.symmetric = symmetric
        self.store = SampleStore(max_samples, seed)

    def _observe(self, rows: torch.Tensor) -> None:
        self.store.add(rows)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.store.data
        assert x is not None
        q = self.percentile / 100
        if self.symmetric:
            t = row_quantile(x.abs(), q)
            return -t, t
        return row_quantile(x, 1 - q), row_quantile(x, q)
