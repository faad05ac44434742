"""The observer interface: see values batch by batch, then say which range to quantize.

An observer is a small accumulator with no global state::

    obs = MinMaxObserver(axis=-1)        # one range per channel of the last axis
    for x in batches:                    # activations (..., C) or a weight (R, C)
        obs.observe(x)
    lo, hi = obs.range()                 # (C,) each; per-tensor (axis=None): 0-d tensors

``axis`` names the channel dimension; every other dimension is pooled. Ranges are float32
on the device of the data. Turning a range into a scale and zero-point is the format's job
(``formats.integer.qparams_from_range``); observers know nothing of schemes beyond the
``bits`` some of them need to predict quantization error.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..errors import SchemeError


class Observer(ABC):
    """Accumulates statistics of the tensors it observes; no state outside the instance.

    Args:
        axis: the channel dimension for per-channel ranges, or None for one range.
    """

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.channels: int | None = None

    def observe(self, x: torch.Tensor) -> None:
        """Add one batch (any shape holding ``axis``)."""
        self._observe(self.rows(x))

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``: 0-d tensors per-tensor, ``(channels,)`` per-channel."""
        if self.channels is None:
            raise SchemeError(f"{type(self).__name__}.range() called before observe()")
        lo, hi = self._range()
        if self.axis is None:
            return lo.reshape(()), hi.reshape(())
        return lo, hi

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as float32 ``(K, M)``: K = channels (1 per-tensor), M values each."""
        x = x.detach().to(torch.float32)
        if self.axis is None:
            r = x.reshape(1, -1)
        else:
            if x.dim() == 0 or not -x.dim() <= self.axis < x.dim():
                raise SchemeError(f"observer axis {self.axis} is out of range for a tensor "
                                  f"of shape {tuple(x.shape)}")
            r = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        if self.channels is not None and r.shape[0] != self.channels:
            raise SchemeError(f"observer saw {self.channels} channels before, now {r.shape[0]}")
        if r.shape[1] == 0:
            raise SchemeError("observer got an empty tensor")
        self.channels = r.shape[0]
        return r

    @abstractmethod
    def _observe(self, rows: torch.Tensor) -> None:
        """Accumulate ``rows`` (K, M)."""

    @abstractmethod
    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` of shape (K,)."""


def fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  symmetric: bool) -> torch.Tensor:
    """``x`` (K, M) through a uniform ``bits``-bit grid covering ``[lo, hi]`` (K, 1).

    Symmetric: levels ``k·Δ``, |k| ≤ 2^(b−1) − 1, Δ = max(|lo|, |hi|) / (2^(b−1) − 1).
    Asymmetric: 2^b levels from ``lo`` to ``hi`` with an integer zero-point.
    """
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        t = torch.maximum(lo.abs(), hi.abs())
        step = torch.where(t > 0, t / qmax, torch.ones_like(t))
        return torch.clamp(torch.round(x / step), -qmax, qmax) * step
    maxq = (1 << bits) - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = torch.where(hi > lo, (hi - lo) / maxq, torch.ones_like(hi))
    z = torch.round(-lo / step)
    return (torch.clamp(torch.round(x / step) + z, 0, maxq) - z) * step


class SampleStore:
    """A bounded, uniform random sample of every value seen, per row (deterministic by seed).

    Holds everything up to ``max_samples`` values per row; beyond that each batch is merged
    so that every value seen so far is kept with the same probability (weighted reservoir
    merge). Rows share the sampled positions, so per-channel samples stay aligned.
    """

    def __init__(self, max_samples: int = 1 << 20, seed: int = 0) -> None:
        if max_samples < 1:
            raise SchemeError("max_samples must be positive")
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.data: torch.Tensor | None = None  # (K, m)
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        m = rows.shape[1]
        if self.data is None:
            self.data, self.seen = self._pick(rows, min(m, self.max_samples)), m
            return
        k = self.data.shape[1]
        total = self.seen + m
        size = min(self.max_samples, k + m)
        if size == k + m:
            self.data = torch.cat([self.data, rows], dim=1)
        else:  # keep old and new values in proportion to how many each stands for
            n_old = min(k, round(size * self.seen / total))
            n_old = max(n_old, size - m)
            self.data = torch.cat([self._pick(self.data, n_old),
                                   self._pick(rows, size - n_old)], dim=1)
        self.seen = total

    def _pick(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        if n >= rows.shape[1]:
            return rows.clone()
        idx = torch.randperm(rows.shape[1], generator=self.generator)[:n].to(rows.device)
        return rows[:, idx]
