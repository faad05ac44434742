"""MSE-optimal range: shrink the observed range and keep the factor with the least error.

For each shrink factor p on a geometric grid from 1 down to ``min_ratio`` (``steps`` values),
the range ``[p·lo, p·hi]`` is tried on a uniform ``bits``-bit grid and scored by
``Σ |x − x̂|^norm`` over the observed values; the best range per channel wins. The grid is
geometric, not the GPTQ reference's linear 1 … 0.21, because activation outliers can sit
100× above the bulk (a Student-t with 2.5 degrees of freedom wants 4-bit ranges near 2 % of
its max). Clipping a heavy tail trades a few large errors for a finer grid everywhere
else, which is exactly what this search weighs.
"""

from __future__ import annotations

import torch

from ..errors import SchemeError
from .base import Observer, SampleStore, fake_quantize


class MSEObserver(Observer):
    """Range minimizing the ``norm``-error of ``bits``-bit quantization of the observed values.

    Args:
        axis: channel dimension, or None.
        bits: grid width the range is optimized for.
        symmetric: ``(−t, t)`` ranges on a symmetric grid, else ``(lo, hi)`` with a zero-point.
        steps, min_ratio: candidate shrink factors ``min_ratio^(i/(steps−1))``, i < steps.
        norm: exponent of the error (2 = MSE; the GPTQ reference uses 2.4).
        max_samples, seed: the :class:`SampleStore` bound (exact below it).
    """

    def __init__(self, axis: int | None = None, bits: int = 8, symmetric: bool = True,
                 steps: int = 100, min_ratio: float = 0.01, norm: float = 2.0,
                 max_samples: int = 1 << 20, seed: int = 0) -> None:
        super().__init__(axis)
        if not 2 <= bits <= 16 or steps < 2 or not 0 < min_ratio < 1 or norm <= 0:
            raise SchemeError("MSEObserver needs 2 <= bits <= 16, steps >= 2, "
                              "0 < min_ratio < 1 and norm > 0")
        self.bits, self.symmetric, self.norm = bits, symmetric, norm
        self.steps, self.min_ratio = steps, min_ratio
        self.store = SampleStore(max_samples, seed)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.store.add(rows)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.store.data
        assert x is not None and self.lo is not None and self.hi is not None
        lo, hi = self.lo[:, None], self.hi[:, None]                 # true extremes (K, 1)
        if self.symmetric:
            t = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -t, t
        best = torch.full_like(lo, float("inf"))
        best_lo, best_hi = lo.clone(), hi.clone()
        for i in range(self.steps):
            p = self.min_ratio ** (i / (self.steps - 1))
            err = self.error(x, p * lo, p * hi)
            better = err < best
            best = torch.where(better, err, best)
            best_lo = torch.where(better, p * lo, best_lo)
            best_hi = torch.where(better, p * hi, best_hi)
        return best_lo.squeeze(1), best_hi.squeeze(1)

    def error(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """``Σ |x − x̂|^norm`` per row for ranges ``lo, hi`` (K, 1) → (K, 1)."""
        x_hat = fake_quantize(x, lo, hi, self.bits, self.symmetric)
        return (x - x_hat).abs().pow(self.norm).sum(1, keepdim=True)
