"""The quantization driver: walk a model's target layers and call a method on each.

It knows the order of layers and what each method asks for, never a method's math.
Methods without calibration needs (RTN, HQQ) go layer by layer on the weights alone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from .errors import EdgequantError, WeightError
from .formats import QuantScheme
from .methods import get_method
from .models.model import Model
from .nn.quant_linear import QuantLinear
from .nn.recipe import Recipe
from .nn.surgery import plan_layers, replace_module, round_kept_tensors, untie_if_needed

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]


def _no_progress(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
    return items


def quantize_model(model: Model, recipe: Recipe, calib: Any = None, inplace: bool = False,
                   progress: Progress = _no_progress) -> Model:
    """Quantize ``model`` by ``recipe``; returns a new ``Model`` (the input is kept unless
    ``inplace``, which saves one copy of the weights)."""
    method = get_method(recipe.method)
    config = method.make_config(recipe.method_options)
    if method.needs_calibration:
        raise EdgequantError(f"method {method.name} needs calibration data, which this "
                             f"pipeline does not collect yet")
    module = model.module if inplace else copy.deepcopy(model.module)
    plan = plan_layers(module, recipe)
    if not plan:
        raise EdgequantError("the recipe selects no layer to quantize")
    untie_if_needed(module, plan)
    layers: dict[str, dict[str, Any]] = {}
    for name in progress(plan, len(plan), "quantizing layers"):
        layers[name] = _quantize_layer(module, name, plan[name], method, config)
    round_kept_tensors(module, recipe.keep_dtype)
    return Model(module, model.tokenizer, dict(model.source), recipe, layers, None)


def _quantize_layer(module: Any, name: str, scheme: QuantScheme, method: Any,
                    config: Any) -> dict[str, Any]:
    linear = module.get_submodule(name)
    try:
        qt = method.quantize_weight(linear.weight.detach(), scheme, {}, config)
    except WeightError as e:
        raise WeightError(f"layer {name}: {e}") from None
    replace_module(module, name, QuantLinear(qt, linear.bias))
    return {"scheme": scheme.to_dict(), "method": method.name, "shape": list(qt.shape),
            "bias": linear.bias is not None, "act_order": qt.g_idx is not None}
