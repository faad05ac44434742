"""Per-layer input statistics that methods ask the pipeline for, accumulated batch by batch.

Each accumulator sees the inputs ``x`` of one linear layer, shape ``(..., in_features)``,
and never holds more than its own summary (an ``(in, in)`` Hessian at most).

| name          | result                                   | used by            |
| ------------- | ---------------------------------------- | ------------------ |
| ``hessian``   | H = (2/n) Σ x xᵀ over n tokens, (in, in) | GPTQ               |
| ``act_absmean`` | mean |x| per input channel, (in,)      | AWQ                |
| ``act_absmax``  | max |x| per input channel, (in,)       | SmoothQuant        |
| ``act_range``   | per-tensor max |x| chosen by an observer, (1,) | static int8  |
| ``act_sumsq``   | Σ x² per input channel, float64, (in,)  | importance matrix  |

Accumulators are built with the method's config; ``act_range`` reads its ``observer`` field
(:data:`ACT_OBSERVERS`), so a static range can be min-max (the default), a percentile, the
TensorRT entropy choice or the MSE-optimal clip instead of the single largest value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..errors import EdgequantError, SchemeError
from .base import Observer
from .histogram import HistogramObserver
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver
from .mse import MSEObserver
from .percentile import PercentileObserver


class Statistic(ABC):
    name: ClassVar[str]

    def __init__(self, in_features: int, config: Any = None) -> None:
        self.in_features = in_features
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        """Add a batch; always in float32, even inside a bf16 autocast region."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if x.shape[-1] != self.in_features:
            raise EdgequantError(f"{self.name}: expected {self.in_features} features, "
                                 f"got {x.shape[-1]}")
        with torch.autocast(x.device.type, enabled=False):
            self._update(x)
        self.n += x.shape[0]

    @abstractmethod
    def _update(self, x: torch.Tensor) -> None: ...

    @abstractmethod
    def result(self) -> torch.Tensor: ...


class Hessian(Statistic):
    name = "hessian"

    def __init__(self, in_features: int, config: Any = None) -> None:
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

    def __init__(self, in_features: int, config: Any = None) -> None:
        super().__init__(in_features)
        self.total = torch.zeros(in_features, dtype=torch.float64)

    def _update(self, x: torch.Tensor) -> None:
        self.total += x.abs().sum(0, dtype=torch.float64)

    def result(self) -> torch.Tensor:
        return (self.total / max(self.n, 1)).to(torch.float32)


class AbsMax(Statistic):
    name = "act_absmax"

    def __init__(self, in_features: int, config: Any = None) -> None:
        super().__init__(in_features)
        self.max = torch.zeros(in_features)

    def _update(self, x: torch.Tensor) -> None:
        self.max = torch.maximum(self.max, x.abs().amax(0))

    def result(self) -> torch.Tensor:
        return self.max


class SumSquares(Statistic):
    """llama.cpp's importance matrix entry: Σ x_j² over tokens (``n`` is the count)."""

    name = "act_sumsq"

    def __init__(self, in_features: int, config: Any = None) -> None:
        super().__init__(in_features)
        self.total = torch.zeros(in_features, dtype=torch.float64)

    def _update(self, x: torch.Tensor) -> None:
        x64 = x.to(torch.float64)
        self.total += (x64 * x64).sum(0)

    def result(self) -> torch.Tensor:
        return self.total


#: observer name -> a per-tensor, symmetric observer of activations (``percentile`` from config)
ACT_OBSERVERS: dict[str, Callable[[float], Observer]] = {
    "minmax": lambda p: MinMaxObserver(),
    "moving-average": lambda p: MovingAverageMinMaxObserver(),
    "percentile": lambda p: PercentileObserver(percentile=p),
    "histogram": lambda p: HistogramObserver(method="percentile", percentile=p),
    "entropy": lambda p: HistogramObserver(method="entropy"),
    "mse": lambda p: MSEObserver(bits=8),
}


def act_observer(name: str, percentile: float = 99.99) -> Observer:
    """The activation observer called ``name`` (a clear error lists the choices)."""
    if name not in ACT_OBSERVERS:
        raise SchemeError(f"unknown observer {name!r}; choose from {', '.join(ACT_OBSERVERS)}")
    return ACT_OBSERVERS[name](percentile)


class ActRange(Statistic):
    name = "act_range"

    def __init__(self, in_features: int, config: Any = None) -> None:
        super().__init__(in_features)
        self.observer = act_observer(getattr(config, "observer", "minmax"),
                                     getattr(config, "percentile", 99.99))

    def _update(self, x: torch.Tensor) -> None:
        self.observer.observe(x)

    def result(self) -> torch.Tensor:
        lo, hi = self.observer.range()
        return torch.maximum(lo.abs(), hi.abs()).reshape(1)


STATISTICS: dict[str, type[Statistic]] = {c.name: c for c in (Hessian, AbsMean, AbsMax,
                                                                 ActRange, SumSquares)}


def make_statistics(needs: frozenset[str] | set[str], in_features: int,
                    config: Any = None) -> dict[str, Statistic]:
    unknown = set(needs) - set(STATISTICS) - {"n_tokens"}
    if unknown:
        raise EdgequantError(f"unknown statistics {sorted(unknown)}; known: {sorted(STATISTICS)}")
    return {n: STATISTICS[n](in_features, config) for n in needs if n in STATISTICS}
