"""The number-format registry and the grouped view every format works on.

A format turns a grouped weight view ``xg`` of shape ``(R, G, g)`` (rows, groups per row,
columns per group) into codes and per-group parameters of shape ``(R, G, 1)``:

    params = fmt.params(xg, scheme)          # fp32 values exactly as decode will see them
    codes  = fmt.encode(xg, params, scheme)  # uint8, same shape as xg
    x_hat  = fmt.decode(codes, params, scheme)

Because parameters broadcast over the last axis, a method that quantizes column by column
(GPTQ) calls ``encode``/``decode`` on a ``(R, 1, 1)`` slice with that column's group
parameters. ``store``/``load`` convert parameters to and from what is written to disk
(fp16 scales, packed zero-points, double-quantized constants), and ``layout`` predicts those
stored tensors' shapes and dtypes, so loading can validate a file before reading it.

| granularity | grouped view of W (R, C)        | params  |
| ----------- | ------------------------------- | ------- |
| tensor      | (1, 1, R*C)                     | (1,1,1) |
| channel     | (R, 1, C)                       | (R,1,1) |
| group g     | (R, ceil(C/g), g), zero-padded  | (R,G,1) |
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from ..errors import SchemeError
from .scheme import FORMATS, QuantScheme

_REGISTRY: dict[str, NumberFormat] = {}
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: stored tensor name -> (shape, dtype): what a scheme writes, checked before data is read
Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]


class NumberFormat(ABC):
    """One family of numbers (int, nf4, fp8, …): pure tensor functions, no model knowledge."""

    name: ClassVar[str]

    @abstractmethod
    def params(self, xg: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """Per-group parameters ``(R, G, 1)`` for ``xg``, already rounded to storage precision."""

    @abstractmethod
    def encode(self, xg: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        """Codes (uint8, values < 2**bits) for ``xg`` under ``params``."""

    @abstractmethod
    def decode(self, codes: torch.Tensor, params: dict[str, torch.Tensor],
               scheme: QuantScheme) -> torch.Tensor:
        """float32 values of ``codes`` under ``params``."""

    def store(self, params: dict[str, torch.Tensor],
              scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """Tensors written to disk; default: every parameter in ``scheme.scale_dtype``."""
        dt = TORCH_DTYPES[scheme.scale_dtype]
        return {k: v.reshape(v.shape[:2]).to(dt).contiguous() for k, v in params.items()}

    def load(self, stored: dict[str, torch.Tensor], scheme: QuantScheme,
             pshape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`store`: fp32 parameters of shape ``(*pshape, 1)``."""
        return {k: v.to(torch.float32).reshape(*pshape, 1) for k, v in stored.items()}

    def layout(self, scheme: QuantScheme,
               pshape: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the tensors :meth:`store` returns."""
        return {"scales": (pshape, TORCH_DTYPES[scheme.scale_dtype])}


def register_format(cls: type[NumberFormat]) -> type[NumberFormat]:
    """Class decorator: instantiating here makes a missing half fail at import, not at use."""
    if cls.name not in FORMATS:
        raise SchemeError(f"format {cls.name!r} is not declared in scheme.FORMATS")
    _REGISTRY[cls.name] = cls()
    return cls


def get_format(name: str) -> NumberFormat:
    if name not in _REGISTRY:  # the formats register when their modules are first imported
        from . import codebook, floating, integer, sign  # noqa: F401
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SchemeError(f"no implementation for format {name!r}; "
                          f"registered: {', '.join(sorted(_REGISTRY))}") from None


def grouped_shape(shape: tuple[int, int], scheme: QuantScheme) -> tuple[int, int, int]:
    """``(R', G, g)`` of the grouped view of a weight of ``shape`` (see the table above)."""
    rows, cols = shape
    if scheme.granularity == "tensor":
        return 1, 1, rows * cols
    if scheme.granularity == "channel":
        return rows, 1, cols
    g = scheme.group_size
    assert g is not None
    return rows, math.ceil(cols / g), g


def group(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The grouped view of a 2-D ``w`` (a ragged last group is zero-padded)."""
    r, n_groups, g = grouped_shape(tuple(w.shape), scheme)  # type: ignore[arg-type]
    if scheme.granularity == "group" and n_groups * g != w.shape[1]:
        w = torch.nn.functional.pad(w, (0, n_groups * g - w.shape[1]))
    return w.reshape(r, n_groups, g)


def ungroup(xg: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`group`: drop padding, back to ``shape``."""
    rows, cols = shape
    return xg.reshape(rows, -1)[:, :cols]


def round_scale_up(s: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Round positive scales to the storage dtype, never down.

    A stored scale smaller than the computed one would push the extreme value past the
    largest code, and its error past half a step; rounding up keeps the bound exact.
    Zero scales (all-zero groups) become 1 so decoding stays finite and exact.
    """
    dt = TORCH_DTYPES[dtype_name]
    s = torch.where(s > 0, s, torch.ones_like(s))
    if dt == torch.float32:
        return s.to(torch.float32)
    r = s.to(dt)
    low = r.to(torch.float32) < s
    r = torch.where(low, torch.nextafter(r, torch.full_like(r, math.inf)), r)
    if not torch.isfinite(r).all():
        raise SchemeError(f"weights too large for {dtype_name} scales; use -fp32 scales")
    return r.to(torch.float32)
