"""Choosing kernels for a whole model, explicitly, and recording the choice.

``use_kernels(module, act_dtype, device, policy)`` selects a kernel for every quantized layer
(:func:`~edgequant.kernels.registry.select_kernel`), prepacks each one at a time (peak memory
grows by one layer) and returns the :class:`KernelPlan`: which kernel runs each layer and,
where a layer fell back to the reference kernel, why. Layers start on the reference kernel;
nothing changes kernel except through this call. :func:`kernel_plan` reads the plan back off
the layers (what a runtime records with its speed results), :func:`describe` answers the
same question for a model without prepacking anything (``edgequant info``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..formats import QuantScheme
from .registry import (
    KernelError,
    LayerSpec,
    check_policy,
    get_kernel,
    registered_kernels,
    select_kernel,
)

if TYPE_CHECKING:
    from ..nn.quant_linear import QuantLinear


@dataclass(frozen=True)
class LayerKernel:
    """One layer's entry in a plan."""

    layer: str
    scheme: str
    shape: tuple[int, int]
    kernel: str
    reason: str | None  # why it is not on a preferred kernel (None: on the best one asked)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel runs each quantized layer of a model, and why the others do not."""

    layers: tuple[LayerKernel, ...]
    policy: str | None = None  # None: read back off the layers (see kernel_plan)

    def counts(self) -> dict[str, int]:
        """Layers per kernel name, most first."""
        return dict(Counter(e.kernel for e in self.layers).most_common())

    def fallbacks(self) -> dict[str, int]:
        """Layers per reason for not running on a preferred kernel, most first."""
        return dict(Counter(e.reason for e in self.layers if e.reason).most_common())

    def summary(self) -> dict[str, Any]:
        """What a runtime records: ``kernels`` (layers per kernel), ``kernel_fallbacks``
        (layers per reason) and ``kernel_summaries`` (what each kernel used computes, so a
        report made from the records alone can say it)."""
        return {"kernels": self.counts(), "kernel_fallbacks": self.fallbacks(),
                "kernel_summaries": {k: get_kernel(k).summary for k in self.counts()}}

    def __str__(self) -> str:
        head = ", ".join(f"{k} ×{n}" for k, n in self.counts().items()) or "no quantized layers"
        lines = [head] + [f"  {n} layer(s) not on a preferred kernel: {why}"
                          for why, n in self.fallbacks().items()]
        return "\n".join(lines)


def _layers(module: Any) -> Iterator[tuple[str, QuantLinear]]:
    from ..nn.quant_linear import QuantLinear

    root: nn.Module = getattr(module, "module", module)  # a Model, or its torch module
    for name, m in root.named_modules():
        if isinstance(m, QuantLinear):
            yield name, m


def _device(layer: nn.Module, device: str | torch.device | None) -> str:
    if device is not None:
        return torch.device(device).type
    return next(iter(layer.buffers()), torch.empty(0)).device.type


def _dtype(act_dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(act_dtype, torch.dtype):
        return act_dtype
    dt = getattr(torch, str(act_dtype), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise KernelError(f"activation dtype {act_dtype!r} is not a torch floating dtype "
                          f"(e.g. float32, bfloat16)")
    return dt


def use_kernels(module: Any, act_dtype: torch.dtype | str,
                device: str | torch.device | None = None, policy: str = "auto") -> KernelPlan:
    """Select and prepack a kernel for every quantized layer of ``module`` (an ``nn.Module``
    or a ``Model``) fed ``act_dtype`` activations on ``device`` (None: where each layer is).

    ``policy``: ``auto`` (the best registered kernel for each layer), ``reference``
    (dequantize-then-matmul everywhere) or a kernel's name (that kernel where it can).
    A layer prepacked into a layout that does not keep the artifact's tensors (``int4_cpu``)
    cannot be saved and cannot move to another kernel: reload the model for that.
    """
    check_policy(policy)
    dt = _dtype(act_dtype)
    entries = []
    for name, layer in _layers(module):
        spec = layer.spec_for(dt, _device(layer, device))
        sel = select_kernel(spec, policy)
        layer.use_kernel(sel.kernel, spec, sel.reason, where=name)
        entries.append(_entry(name, layer))
    return KernelPlan(tuple(entries), policy)


def _entry(name: str, layer: QuantLinear) -> LayerKernel:
    return LayerKernel(name, layer.scheme.name, (layer.out_features, layer.in_features),
                       layer.kernel.name, layer.kernel_reason)


def kernel_plan(module: Any) -> KernelPlan:
    """The plan as the layers of ``module`` hold it now."""
    return KernelPlan(tuple(_entry(n, m) for n, m in _layers(module)))


def describe(source: Any, act_dtype: torch.dtype | str, device: str | torch.device = "cpu",
             policy: str = "auto") -> list[dict[str, Any]]:
    """The kernel each quantized layer would run on, and why not a preferred one, without
    prepacking (or even building) anything: ``[{layer, scheme, shape, key, kernel, reason}]``.

    ``source``: a model (``nn.Module`` or ``Model``), or an artifact manifest's ``layers``
    mapping (layer name → record with ``scheme`` (a dict or a name), ``shape`` and
    optionally ``act_order``), so ``edgequant info`` can answer from the manifest alone.
    """
    check_policy(policy)
    dt = _dtype(act_dtype)
    dev = torch.device(device).type
    if isinstance(source, Mapping):
        specs = [(name, _record_spec(rec, dt, dev)) for name, rec in source.items()]
    else:
        specs = [(name, layer.spec_for(dt, _device(layer, device)))
                 for name, layer in _layers(source)]
    out = []
    for name, spec in specs:
        sel = select_kernel(spec, policy)
        out.append({"layer": name, "scheme": spec.scheme.name, "shape": list(spec.shape),
                    "key": str(spec.key), "kernel": sel.kernel.name, "reason": sel.reason})
    return out


def _record_spec(rec: Mapping[str, Any], act_dtype: torch.dtype, device: str) -> LayerSpec:
    scheme = rec["scheme"]
    scheme = QuantScheme.from_dict(dict(scheme)) if isinstance(scheme, Mapping) \
        else QuantScheme.parse(scheme)
    n, k = rec["shape"]
    return LayerSpec(scheme, (int(n), int(k)), act_dtype, device, bool(rec.get("act_order")))


def kernel_summaries() -> dict[str, str]:
    """One line per registered kernel: what it computes (for ``info`` and reports)."""
    return {k.name: k.summary for k in registered_kernels()}
