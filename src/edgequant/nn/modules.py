"""Quantized module classes by name, so an artifact can say which one each layer uses."""

from __future__ import annotations

from torch import nn

from .quant_linear import QuantLinear
from .w8a8 import W8A8Linear

MODULES: dict[str, type[nn.Module]] = {"quant_linear": QuantLinear, "w8a8_linear": W8A8Linear}


def module_class(name: str) -> type[nn.Module]:
    try:
        return MODULES[name]
    except KeyError:
        from ..errors import ArtifactError

        raise ArtifactError(f"unknown quantized module {name!r}; known: {sorted(MODULES)}") \
            from None
