"""Min-max observers: the running extremes, or their exponential moving average."""

from __future__ import annotations

import torch

from ..errors import SchemeError
from .base import Observer


class MinMaxObserver(Observer):
    """The smallest and largest value seen (per channel along ``axis``)."""

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)  # (K,)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo.clone(), self.hi.clone()


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max (the first batch sets them).

    ``lo ← lo + c·(min(batch) − lo)`` with ``c = averaging_constant`` (PyTorch's default 0.01):
    one extreme batch moves the range by c of the way, so rare outliers are damped.
    """

    def __init__(self, axis: int | None = None, averaging_constant: float = 0.01) -> None:
        super().__init__(axis)
        if not 0 < averaging_constant <= 1:
            raise SchemeError(f"averaging_constant must be in (0, 1], not {averaging_constant}")
        self.c = averaging_constant
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(1), rows.amax(1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.lo is not None and self.hi is not None
        return self.lo.clone(), self.hi.clone()
