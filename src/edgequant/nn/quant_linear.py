"""``QuantLinear``: a linear layer that stores packed codes and computes by dequantizing.

Everything a ``QuantizedTensor`` stores becomes a buffer under the same name (``qweight``,
``scales``, ``zeros``, …), so a model's ``state_dict`` *is* the artifact's tensor layout and
``nbytes`` counts exactly what is kept in memory. The forward pass dequantizes and calls a
dense matmul: simple and exact. :func:`dequantized_weights_cached` keeps those weights
between calls where memory is not being measured (accuracy metrics), and
:mod:`edgequant.nn.int4_cpu` runs 4-bit layers on a fused kernel for deployment speed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme

Record = dict  # a layer's entry in the artifact manifest (see pipeline.layer_record)


class QuantLinear(nn.Module):
    """y = x · dequant(W)ᵀ + b, with W kept packed."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.scheme: QuantScheme = qt.scheme
        self.out_features, self.in_features = qt.shape
        self._names = tuple(qt.tensors())
        for name, t in qt.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self._cache: dict[torch.dtype, torch.Tensor] | None = None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: torch.Tensor | None,
                       stats: dict | None = None, config: object = None) -> QuantLinear:
        """The layer a method's result becomes (subclasses may use calibration ``stats``)."""
        if not qt.scheme.is_weight_only:
            raise SchemeError(f"{qt.scheme.name} quantizes activations too, which a weight-only "
                              f"layer cannot do; use the dynamic, static or smoothquant method")
        return cls(qt, bias)

    def record_extra(self) -> dict:
        """Manifest fields beyond scheme/shape/bias that :meth:`skeleton` needs."""
        return {"act_order": getattr(self, "g_idx", None) is not None}

    @classmethod
    def skeleton(cls, record: Record, where: str = "") -> QuantLinear:
        """An uninitialised layer with the buffers a manifest record describes (for loading)."""
        scheme = QuantScheme.from_dict(record["scheme"])
        shape = tuple(record["shape"])
        layout = QuantizedTensor.layout(shape, scheme,  # type: ignore[arg-type]
                                        act_order=record.get("act_order", False))
        empty = {k: torch.empty(s, dtype=d) for k, (s, d) in layout.items()}
        qt = QuantizedTensor.from_tensors(empty, scheme, shape, where=where)  # type: ignore[arg-type]
        return cls(qt, torch.empty(shape[0]) if record.get("bias") else None)

    def quantized(self) -> QuantizedTensor:
        t = {n: getattr(self, n) for n in self._names}
        stored = {k: v for k, v in t.items() if k not in ("qweight", "g_idx")}
        return QuantizedTensor(self.scheme, (self.out_features, self.in_features),
                               t["qweight"], stored, t.get("g_idx"))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self._cache is None else self._cache.get(x.dtype)
        if w is None:
            w = self.dequantized_weight(x.dtype)
            if self._cache is not None:
                self._cache[x.dtype] = w
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight (codes and parameters); the bias is counted apart."""
        return self.quantized().nbytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme.name}, bias={self.bias is not None}")


@contextmanager
def dequantized_weights_cached(module: nn.Module) -> Iterator[None]:
    """Inside, each ``QuantLinear`` of ``module`` dequantizes once and keeps the result:
    the same outputs bit for bit, without re-dequantizing on every forward (a decode step
    spends ~20× the matmul doing that). It holds a float copy of every quantized weight, so
    it is for computing accuracy metrics, never for measuring memory or speed."""
    layers = [m for m in module.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m._cache = {}
    try:
        yield
    finally:
        for m in layers:
            m._cache = None
