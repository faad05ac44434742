"""Quantizers and transforms register by name; adding one is one file.

Two kinds of step, kept apart (STYLE.md §5):

- A **quantizer** chooses codes for one layer: ``quantize_weight(W, scheme, stats, config)``
  returns a ``QuantizedTensor`` (RTN, GPTQ, HQQ, int8 dynamic/static). ``needs`` names the
  calibration statistics it asks the statistics engine for (``observers.stats``); ``module``
  names the ``nn`` class that holds the result.
- A **transform** rewrites a block's float weights before its layers are quantized (AWQ and
  SmoothQuant fold scales); it observes what it needs itself. Transforms compose in front of
  any quantizer (``awq+gptq``); a recipe that names only transforms gets the first one's
  ``default_quantizer`` (``awq`` → RTN, as the paper; ``smoothquant`` → int8).

Every step has its own frozen options dataclass (``config_cls``), and that class identifies
the step: a recipe holds config instances (``GPTQConfig(act_order=True)``), which the registry
maps back to their step. Options given as text or JSON go through :func:`make_config`, which
checks names and types and names the valid ones on error.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import SchemeError
from ..formats import QuantizedTensor, QuantScheme

QuantizeWeight = Callable[[torch.Tensor, QuantScheme, dict[str, Any], Any], QuantizedTensor]
#: apply(block, ctx) rescales a block's weights in place before its layers are quantized
BlockTransform = Callable[[Any, Any], None]


@dataclass(frozen=True)
class Quantizer:
    """A registered quantizer (see the module docstring)."""

    name: str
    quantize_weight: QuantizeWeight
    config_cls: type
    needs: frozenset[str] = frozenset()
    module: str = "quant_linear"
    description: str = ""
    aliases: tuple[str, ...] = ()

    kind = "quantizer"


@dataclass(frozen=True)
class Transform:
    """A registered transform; ``default_quantizer(scheme)`` names the quantizer a recipe of
    transforms alone uses."""

    name: str
    apply: BlockTransform
    config_cls: type
    default_quantizer: Callable[[QuantScheme], str] = lambda scheme: "rtn"
    description: str = ""
    aliases: tuple[str, ...] = ()

    kind = "transform"


Step = Quantizer | Transform
_STEPS: dict[str, Step] = {}
_BY_CONFIG: dict[type, Step] = {}


def register(step: Step) -> Step:
    """Register a quantizer or transform under its name and aliases (once each)."""
    if not dataclasses.is_dataclass(step.config_cls) or \
            not step.config_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{step.name}: config_cls must be a frozen dataclass")
    for key in (step.name, *step.aliases):
        if key in _STEPS:
            raise ValueError(f"step name {key!r} registered twice")
    if step.config_cls in _BY_CONFIG:
        raise ValueError(f"{step.config_cls.__name__} already identifies "
                         f"{_BY_CONFIG[step.config_cls].name}")
    for key in (step.name, *step.aliases):
        _STEPS[key] = step
    _BY_CONFIG[step.config_cls] = step
    return step


def _load_builtin() -> None:
    from . import awq, gptq, hqq, int8, rtn, smoothquant  # noqa: F401  (registration)


def get_step(name: str) -> Step:
    """The quantizer or transform called ``name`` (or an alias)."""
    _load_builtin()
    try:
        return _STEPS[name.strip().lower()]
    except KeyError:
        raise SchemeError(f"unknown method {name!r}; quantizers: {', '.join(list_quantizers())}"
                          f"; transforms: {', '.join(list_transforms())} (compose as "
                          "transform+quantizer, e.g. awq+gptq)") from None


def get_quantizer(name: str) -> Quantizer:
    step = get_step(name)
    if not isinstance(step, Quantizer):
        raise SchemeError(f"{step.name} is a transform, not a quantizer; put a quantizer "
                          f"after it ({', '.join(list_quantizers())})")
    return step


def get_transform(name: str) -> Transform:
    step = get_step(name)
    if not isinstance(step, Transform):
        raise SchemeError(f"{step.name} is a quantizer, not a transform; transforms: "
                          f"{', '.join(list_transforms())}")
    return step


def step_of(config: Any) -> Step:
    """The registered step a config instance belongs to."""
    _load_builtin()
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise SchemeError(f"{type(config).__name__} is not the options class of any "
                          "registered quantizer or transform") from None


def list_quantizers() -> list[str]:
    _load_builtin()
    return sorted({s.name for s in _STEPS.values() if isinstance(s, Quantizer)})


def list_transforms() -> list[str]:
    _load_builtin()
    return sorted({s.name for s in _STEPS.values() if isinstance(s, Transform)})


def list_methods() -> list[str]:
    """Every name a recipe can start from: quantizers and transforms."""
    return sorted({*list_quantizers(), *list_transforms()})


def is_step_name(name: str) -> bool:
    _load_builtin()
    return name.strip().lower() in _STEPS


# --- options --------------------------------------------------------------------------------

def option_value(text: str) -> Any:
    """A method option's value from text: 'true' → True, '0.02' → 0.02, '128' → 128,
    anything else stays a string (``--set`` and ``--methods`` items parse alike)."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
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


def option_fields(config_cls: type) -> dict[str, Any]:
    """``{field name: its type}`` of an options dataclass."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def make_config(step: Step, options: dict[str, Any] | None = None) -> Any:
    """``step.config_cls(**options)`` with every name and type checked first.

    Values are coerced only where nothing is lost: an int for a float field, a list (JSON)
    for a tuple field. Anything else that does not match the field's type is refused.
    """
    fields = option_fields(step.config_cls)
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "none"
            raise SchemeError(f"{step.name} has no option {key!r}; valid options: {valid}")
        kwargs[key] = _coerce(value, fields[key], f"{step.name} option {key}")
    return step.config_cls(**kwargs)


def config_options(config: Any) -> dict[str, Any]:
    """A config's options as JSON-ready values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(typ):
            try:
                return _coerce(value, arm, where)
            except SchemeError:
                continue
        raise SchemeError(f"{where}: {value!r} is not {_type_name(typ)}")
    if typ is type(None):
        if value is None:
            return None
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, list | tuple):
            (arm, *_rest) = typing.get_args(typ) or (Any,)
            return tuple(x if arm is Any else _coerce(x, arm, where) for x in items)
    raise SchemeError(f"{where}: {value!r} is not {_type_name(typ)}")


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(typ))
    if typ is type(None):
        return "None"
    return getattr(typ, "__name__", str(typ))

