"""Methods register by name; adding one is one file.

A method chooses codes for one layer: ``quantize_weight(W, scheme, stats, config)`` returns a
``QuantizedTensor``. ``needs`` names the calibration statistics it asks the pipeline for
(``observers.stats``: ``hessian``, ``act_absmean``, ``act_absmax``); an empty set and no
transform means no calibration data at all. An optional block ``transform`` (AWQ/SmoothQuant
scale folding) runs on each block before its layers are quantized — transforms are not
quantizers, so a method composes one with a ``quantize_weight``. ``module`` names the
``nn`` module class (``nn.modules.MODULES``) that holds the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme

QuantizeWeight = Callable[[torch.Tensor, QuantScheme, dict[str, torch.Tensor], Any],
                          QuantizedTensor]
#: transform(block, ctx) rescales a block's weights in place before its layers are quantized
BlockTransform = Callable[[Any, Any], None]


@dataclass(frozen=True)
class Method:
    """A registered quantization method."""

    name: str
    quantize_weight: QuantizeWeight
    needs: frozenset[str] = frozenset()
    config_cls: type | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    transform: BlockTransform | None = None
    module: str = "quant_linear"

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs) or self.transform is not None

    def make_config(self, options: dict[str, Any] | None = None) -> Any:
        if self.config_cls is None:
            if options:
                raise SchemeError(f"method {self.name} takes no options, got {sorted(options)}")
            return None
        try:
            return self.config_cls(**(options or {}))
        except TypeError as e:
            raise SchemeError(f"bad options for method {self.name}: {e}") from None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    for key in (method.name, *method.aliases):
        if key in _METHODS:
            raise ValueError(f"method name {key!r} registered twice")
        _METHODS[key] = method
    return method


def get_method(name: str) -> Method:
    from . import awq, gptq, hqq, int8, rtn, smoothquant  # noqa: F401  (registration)

    try:
        return _METHODS[name.lower()]
    except KeyError:
        raise SchemeError(f"unknown method {name!r}; available: {', '.join(list_methods())}") \
            from None


def list_methods() -> list[str]:
    from . import awq, gptq, hqq, int8, rtn, smoothquant  # noqa: F401

    return sorted({m.name for m in _METHODS.values()})


def option_value(text: str) -> Any:
    """A method option's value from text: 'true' → True, '0.02' → 0.02, '128' → 128,
    anything else stays a string (``--set`` and ``--methods`` items parse alike)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_options(fields: list[str], where: str) -> dict[str, Any]:
    """``["act_order=true", "damp=0.02"]`` → ``{"act_order": True, "damp": 0.02}``."""
    out = {}
    for f in fields:
        key, sep, value = f.partition("=")
        if not sep or not key.strip():
            raise SchemeError(f"{where}: a method option is KEY=VALUE, not {f!r}")
        out[key.strip()] = option_value(value.strip())
    return out
