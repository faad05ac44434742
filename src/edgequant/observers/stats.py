"""Per-layer input statistics that methods ask the pipeline for, accumulated batch by batch.

Each accumulator sees the inputs ``x`` of one linear layer, shape ``(..., in_features)``,
and never holds more than its own summary (an ``(in, in)`` Hessian at most).

| name          | result                                   | used by            |
| ------------- | ---------------------------------------- | ------------------ |
| ``hessian``   | H = (2/n) Σ x xᵀ over n tokens, (in, in) | GPTQ               |
| ``act_absmean`` | mean |x| per input channel, (in,)      | AWQ                |
| ``act_absmax``  | max |x| per input channel, (in,)       | SmoothQuant        |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..errors import EdgequantError


class Statistic(ABC):
    name: ClassVar[str]

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if x.shape[-1] != self.in_features:
            raise EdgequantError(f"{self.name}: expected {self.in_features} features, "
                                 f"got {x.shape[-1]}")
        self._update(x)
        self.n += x.shape[0]

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def result(self) -> torch.Tensor: ...


class Hessian(Statistic):
    name = "hessian"

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.H = torch.zeros(in_features, in_features)

    def _update(self, x: torch.Tensor) -> None:  # running mean keeps H O(1) in magnitude
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        x = x * (2.0 / (self.n + m)) ** 0.5
        self.H += x.T @ x

    def result(self) -> torch.Tensor:
        return self.H


class AbsMean(Statistic):
    name = "act_absmean"

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.total = torch.zeros(in_features, dtype=torch.float64)

    def _update(self, x: torch.Tensor) -> None:
        self.total += x.abs().sum(0, dtype=torch.float64)

    def result(self) -> torch.Tensor:
        return (self.total / max(self.n, 1)).to(torch.float32)


class AbsMax(Statistic):
    name = "act_absmax"

    def __init__(self, in_features: int) -> None:
        super().__init__(in_features)
        self.max = torch.zeros(in_features)

    def _update(self, x: torch.Tensor) -> None:
        self.max = torch.maximum(self.max, x.abs().amax(0))

    def result(self) -> torch.Tensor:
        return self.max


STATISTICS: dict[str, type[Statistic]] = {c.name: c for c in (Hessian, AbsMean, AbsMax)}


def make_statistics(needs: frozenset[str] | set[str], in_features: int) -> dict[str, Statistic]:
    unknown = set(needs) - set(STATISTICS) - {"n_tokens"}
    if unknown:
        raise EdgequantError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    return {n: STATISTICS[n](in_features) for n in needs if n in STATISTICS}
