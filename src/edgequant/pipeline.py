"""The quantization driver: walk a model and call a method on each layer.

It knows the order of blocks and layers and what each method asks for, never a method's math.

- Methods that need no data (RTN, HQQ) go layer by layer on the weights alone.
- Calibrated methods go block by block (the GPTQ/AWQ recipe): capture the inputs of block 0
  for every calibration sample; then for each block run the method's optional transform
  (AWQ/SmoothQuant scale folding), collect the statistics it asks for with forward hooks,
  quantize the block's linears, and recompute the block's outputs *with the quantized
  weights* to feed the next block. Peak memory is one block plus the calibration
  activations (two copies: inputs and outputs), never a second copy of the model when
  ``inplace``. The block forwards run in the calibration's ``compute_dtype`` (bf16 autocast
  where the CPU has it, see ``data.calibration``); statistics and quantization stay float32.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.calibration import Calibration, CalibrationSpec
from .errors import EdgequantError, WeightError
from .formats import QuantScheme
from .methods import Method, get_method
from .models.architectures import ArchSpec, block_list, spec_for
from .models.model import Model
from .nn.modules import module_class
from .nn.recipe import Recipe
from .nn.surgery import plan_layers, replace_module, round_kept_tensors, untie_if_needed
from .observers.stats import Statistic, make_statistics

Progress = Callable[[Iterable[Any], int, str], Iterable[Any]]
MAX_BATCH = 8


def _no_progress(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
    return items


@dataclass
class BlockContext:
    """What a block transform may use: the block, its inputs and which layers get which scheme."""

    block: nn.Module
    index: int
    spec: ArchSpec
    inputs: list[torch.Tensor]  # per batch, (B, T, hidden)
    kwargs: dict[str, Any]  # the block's other forward arguments (rotary, mask, …)
    schemes: dict[str, QuantScheme]  # block-relative linear path -> scheme
    config: Any

    def run(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        return [_block_out(self.block(x, **self.kwargs)) for x in (inputs or self.inputs)]


def quantize_model(model: Model, recipe: Recipe,
                   calib: Calibration | CalibrationSpec | torch.Tensor | None = None,
                   inplace: bool = False, progress: Progress = _no_progress) -> Model:
    """Quantize ``model`` by ``recipe``; returns a new ``Model`` (the input is kept unless
    ``inplace``, which saves one copy of the weights).

    ``calib`` is used only by methods that need activations: token windows ``(N, T)``, a
    ``Calibration``, or a ``CalibrationSpec`` (``eq.data.calibration(...)``) resolved with
    the model's tokenizer; when such a method gets none, the default spec is used.
    """
    method = get_method(recipe.method)
    config = method.make_config(recipe.method_options)
    if not method.needs_calibration:
        calib = None
    elif calib is None:
        calib = CalibrationSpec()
    if isinstance(calib, CalibrationSpec):
        calib = calib.build(model.tokenizer)
    elif isinstance(calib, torch.Tensor):
        calib = Calibration(calib)
    module = model.module if inplace else copy.deepcopy(model.module)
    plan = plan_layers(module, recipe)
    if not plan:
        raise EdgequantError("the recipe selects no layer to quantize")
    untie_if_needed(module, plan)
    # calibrate on the tensors we will ship (the weights to quantize stay exact)
    round_kept_tensors(module, recipe.keep_dtype, skip={f"{n}.weight" for n in plan})
    layers: dict[str, dict[str, Any]] = {}
    if method.needs_calibration:
        assert isinstance(calib, Calibration)
        _quantize_blocks(module, plan, method, config, calib, layers, progress)
    for name in progress([n for n in plan if n not in layers], len(plan) - len(layers),
                         "quantizing layers"):
        layers[name] = _quantize_layer(module, name, plan[name], method, config, {})
    round_kept_tensors(module, recipe.keep_dtype)  # again: transforms may have changed some
    return Model(module, model.tokenizer, dict(model.source), recipe,
                 {n: layers[n] for n in plan}, calib.description if calib else None)


def _quantize_layer(module: nn.Module, name: str, scheme: QuantScheme, method: Method,
                    config: Any, stats: dict[str, Any]) -> dict[str, Any]:
    linear = module.get_submodule(name)
    try:
        qt = method.quantize_weight(linear.weight.detach(), scheme, stats, config)
    except WeightError as e:
        raise WeightError(f"layer {name}: {e}") from None
    except EdgequantError as e:
        raise type(e)(f"layer {name}: {e}") from None
    cls = module_class(method.module)
    new = cls.from_quantized(qt, linear.bias, stats, config)  # type: ignore[attr-defined]
    replace_module(module, name, new)
    return layer_record(new, method)


def layer_record(layer: nn.Module, method: Method) -> dict[str, Any]:
    """A quantized layer's manifest entry: enough to rebuild its skeleton for loading."""
    return {"scheme": layer.scheme.to_dict(), "method": method.name,  # type: ignore[union-attr]
            "module": method.module, "shape": [layer.out_features, layer.in_features],
            "bias": layer.bias is not None, **layer.record_extra()}  # type: ignore[operator]


# --------------------------------------------------------------------- calibrated path
def _batches(tokens: torch.Tensor) -> list[torch.Tensor]:
    n = tokens.shape[0]
    size = max(b for b in range(1, min(MAX_BATCH, n) + 1) if n % b == 0)
    return list(tokens.split(size))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(module: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor]
                         ) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Block 0's input for every batch, and each block's keyword arguments.

    Keyword arguments (rotary embeddings, masks) depend only on the batch shape, which is
    the same for every batch, so they are recorded once from a forward of batch 0 in which
    every block is stood in for by a stub that records its arguments and passes the hidden
    states through (the model computes them before its block loop), and the last stub stops
    the run: no block, final norm or LM head is computed for this.
    """
    kwargs: list[dict[str, Any]] = [{} for _ in blocks]
    inputs: list[torch.Tensor] = []

    def stub(i: int) -> Callable[..., torch.Tensor]:
        def forward(*args: Any, **kw: Any) -> torch.Tensor:
            hidden = args[0] if args else kw["hidden_states"]
            kwargs[i] = {k: v for k, v in kw.items()
                         if k not in ("hidden_states", "past_key_values", "past_key_value")}
            kwargs[i]["use_cache"] = False
            if i == len(blocks) - 1:
                raise _Stop
            return hidden
        return forward

    for i, b in enumerate(blocks):
        b.forward = stub(i)  # type: ignore[method-assign]
    try:
        with contextlib.suppress(_Stop):
            module(input_ids=batches[0], use_cache=False)
    finally:
        for b in blocks:
            del b.forward

    def catch(mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        inputs.append((args[0] if args else kw["hidden_states"]).detach())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                module(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return inputs, kwargs


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _quantize_blocks(module: nn.Module, plan: dict[str, QuantScheme], method: Method,
                     config: Any, calib: Calibration, layers: dict[str, dict[str, Any]],
                     progress: Progress) -> None:
    spec = spec_for(module)
    blocks = block_list(module, spec)
    inputs, kwargs = capture_block_inputs(module, blocks, _batches(calib.tokens))
    for i in progress(range(len(blocks)), len(blocks), "quantizing blocks"):
        block = blocks[i]
        prefix = f"{spec.blocks}.{i}."
        schemes = {n[len(prefix):]: s for n, s in plan.items() if n.startswith(prefix)}
        if not schemes:
            with _compute(calib):
                inputs = [_block_out(block(x, **kwargs[i])).to(x.dtype) for x in inputs]
            continue
        with _compute(calib):
            if method.transform is not None:
                method.transform(block, BlockContext(block, i, spec, inputs, kwargs[i],
                                                     schemes, config))
            stats = _collect(block, schemes, method.needs, inputs, kwargs[i], config)
        for path, scheme in schemes.items():
            layer_stats = {k: v.result() for k, v in stats[path].items()}
            layer_stats["n_tokens"] = sum(x.shape[0] * x.shape[1] for x in inputs)
            layers[prefix + path] = _quantize_layer(module, prefix + path, scheme, method,
                                                    config, layer_stats)
        with _compute(calib):
            inputs = [_block_out(block(x, **kwargs[i])).to(x.dtype) for x in inputs]


def _compute(calib: Calibration) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the calibration forwards (a no-op in float32). Its weight cache stays off:
    transforms change weights in place between forwards (AWQ tries candidate scales, folding
    rescales norms and linears), and a cached bf16 copy would silently keep the old ones."""
    if calib.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=calib.dtype, cache_enabled=False)


def _collect(block: nn.Module, schemes: dict[str, QuantScheme], needs: frozenset[str],
             inputs: list[torch.Tensor], kwargs: dict[str, Any], config: Any = None
             ) -> dict[str, dict[str, Statistic]]:
    """Run the (not yet quantized) block over the inputs with hooks on its target linears.

    Linears fed the very same input tensor (q/k/v after the attention norm, gate/up after the
    MLP norm) share one set of accumulators: the first such layer's statistics are aliased to
    the others, so a Hessian is accumulated once per distinct input instead of once per layer.
    """
    stats = {p: make_statistics(needs, block.get_submodule(p).in_features, config)
             for p in schemes}
    if not any(stats.values()):
        return stats
    shared: set[str] = set()                        # paths aliased to an earlier layer's stats
    fed: list[tuple[torch.Tensor, str]] = []        # this forward's inputs (held: no reuse)

    def hook(path: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            if path in shared:
                return
            x = args[0]
            first = next((p for t, p in fed if t is x), None)
            if first is not None and first != path and stats[first].keys() == stats[path].keys():
                stats[path] = stats[first]
                shared.add(path)
                return
            fed.append((x, path))
            for s in stats[path].values():
                s.update(x)
        return fn

    handles = [block.get_submodule(p).register_forward_hook(hook(p)) for p in schemes]
    try:
        for x in inputs:
            block(x, **kwargs)
            fed.clear()
    finally:
        for h in handles:
            h.remove()
    return stats
