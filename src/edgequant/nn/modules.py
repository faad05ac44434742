"""Quantized module classes by name, so an artifact can say which one each layer uses."""

from __future__ import annotations

from torch import nn

from .quant_linear import QuantLinear

MODULES: dict[str, type[nn.Module]] = {"quant_linear": QuantLinear}


def module_class(name: str) -> type[nn.Module]:
    try:
        return MODULES[name]
    except KeyError:
        from ..errors import ArtifactError

        raise ArtifactError(f"unknown quantized module {name!r}; known: {sorted(MODULES)}") \
            from None
