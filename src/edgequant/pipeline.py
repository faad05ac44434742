"""The quantization driver: walk a model and apply a recipe's steps to each layer.

It knows the order of blocks and layers and what each step asks for, never a step's math.

- A recipe that needs no data (RTN, HQQ, dynamic int8) goes layer by layer on the weights.
- A calibrated recipe goes block by block through the statistics engine
  (:func:`edgequant.statistics.walk_blocks`): for each block, run the recipe's transforms in
  order (AWQ/SmoothQuant scale folding), collect the statistics the quantizer asks for, quantize
  the block's linears, and let the engine recompute the block's outputs *with the quantized
  weights* to feed the next block. Peak memory is one block plus the calibration activations,
  never a second copy of the model when ``inplace``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data.calibration import Calibration, CalibrationSpec, resolve
from .errors import EdgequantError, WeightError
from .formats import QuantScheme
from .methods.registry import Quantizer, Transform, step_of
from .models.model import Model
from .nn.modules import module_class
from .nn.surgery import plan_layers, replace_module, round_kept_tensors, untie_if_needed
from .progress import Progress, no_progress
from .recipe import Recipe
from .statistics import BlockInputs, collect, compute_context, walk_blocks


@dataclass
class BlockContext(BlockInputs):
    """What a transform may use: the block, its inputs, which layers get which scheme (paths
    relative to the block) and the transform's options."""

    schemes: dict[str, QuantScheme] = field(default_factory=dict)
    config: Any = None


def quantize_model(model: Model, recipe: Recipe,
                   calib: Calibration | CalibrationSpec | torch.Tensor | None = None,
                   inplace: bool = False, progress: Progress = no_progress) -> Model:
    """Quantize ``model`` by ``recipe``; returns a new ``Model`` (the input is kept unless
    ``inplace``, which saves one copy of the weights).

    ``calib`` is used only by recipes that need activations: token windows ``(N, T)``, a
    ``Calibration``, or a ``CalibrationSpec`` (``eq.data.calibration(...)``) resolved with
    the model's tokenizer; when such a recipe gets none, the default spec is used.
    """
    quantizer = step_of(recipe.quantizer)
    assert isinstance(quantizer, Quantizer)
    calibration = resolve(calib, model.tokenizer) if recipe.needs_calibration else None
    module = model.module if inplace else copy.deepcopy(model.module)
    plan = plan_layers(module, recipe)
    if not plan:
        raise EdgequantError("the recipe selects no layer to quantize")
    untie_if_needed(module, plan)
    # calibrate on the tensors we will ship (the weights to quantize stay exact)
    round_kept_tensors(module, recipe.keep_dtype, skip={f"{n}.weight" for n in plan})
    layers: dict[str, dict[str, Any]] = {}
    if calibration is not None:
        _quantize_blocks(module, plan, recipe, quantizer, calibration, layers, progress)
    rest = [n for n in plan if n not in layers]
    for name in progress(rest, len(rest), "quantizing layers"):
        layers[name] = _quantize_layer(module, name, plan[name], quantizer, recipe.quantizer, {})
    round_kept_tensors(module, recipe.keep_dtype)  # again: transforms may have changed some
    return Model(module, model.tokenizer, dict(model.source), recipe,
                 {n: layers[n] for n in plan},
                 calibration.description if calibration is not None else None)


def _quantize_layer(module: nn.Module, name: str, scheme: QuantScheme, quantizer: Quantizer,
                    config: Any, stats: dict[str, Any]) -> dict[str, Any]:
    linear: Any = module.get_submodule(name)
    try:
        qt = quantizer.quantize_weight(linear.weight.detach(), scheme, stats, config)
    except WeightError as e:
        raise WeightError(f"layer {name}: {e}") from None
    except EdgequantError as e:
        raise type(e)(f"layer {name}: {e}") from None
    cls = module_class(quantizer.module)
    new: Any = cls.from_quantized(qt, linear.bias, stats, config)  # type: ignore[attr-defined]
    replace_module(module, name, new)
    return layer_record(new, quantizer)


def layer_record(layer: Any, quantizer: Quantizer) -> dict[str, Any]:
    """A quantized layer's manifest entry: enough to rebuild its skeleton for loading."""
    return {"scheme": layer.scheme.to_dict(), "method": quantizer.name,
            "module": quantizer.module, "shape": [layer.out_features, layer.in_features],
            "bias": layer.bias is not None, **layer.record_extra()}


@torch.no_grad()
def _quantize_blocks(module: nn.Module, plan: dict[str, QuantScheme], recipe: Recipe,
                     quantizer: Quantizer, calib: Calibration,
                     layers: dict[str, dict[str, Any]], progress: Progress) -> None:
    transforms = [(step_of(t), t) for t in recipe.transforms]
    for item in walk_blocks(module, calib, progress, "quantizing blocks"):
        schemes = {n[len(item.prefix):]: s for n, s in plan.items()
                   if n.startswith(item.prefix)}
        if not schemes:
            continue
        for step, config in transforms:
            assert isinstance(step, Transform)
            ctx = BlockContext(item.block, item.index, item.prefix, item.spec, item.inputs,
                               item.kwargs, calib, schemes, config)
            with compute_context(calib):
                step.apply(item.block, ctx)
        stats = collect(item, schemes, quantizer.needs, recipe.quantizer)
        for path, scheme in schemes.items():
            layer_stats: dict[str, Any] = {k: v.result() for k, v in stats[path].items()}
            layer_stats["n_tokens"] = item.n_tokens
            layers[item.prefix + path] = _quantize_layer(module, item.prefix + path, scheme,
                                                         quantizer, recipe.quantizer,
                                                         layer_stats)
