"""``Model``: a causal LM with its tokenizer, where it came from, and how it was quantized.

What ``eq.load`` returns and ``eq.quantize`` produces. It knows its own size honestly
(every stored byte, tied tensors once) and saves itself as a native artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.quant_linear import QuantLinear
from ..recipe import Recipe
from ..sizes import size_record


@dataclass
class Model:
    """A loaded (possibly quantized) causal language model.

    Attributes:
        module: the transformers model (eval mode).
        tokenizer: its tokenizer.
        source: identity of the original weights: ``name``, ``path``, ``sha256``, ``kind``.
        recipe: how it was quantized (None for an original model).
        layers: per quantized layer: scheme, method, shape — what ``info`` reports.
        calibration: description of the calibration data, if a method used any.
    """

    module: nn.Module
    tokenizer: Any
    source: dict[str, Any]
    recipe: Recipe | None = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return str(self.source.get("name", "model"))

    @property
    def is_quantized(self) -> bool:
        return self.recipe is not None

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write a native artifact folder (atomic; refuses to overwrite unless ``force``)."""
        from .artifact import save_artifact

        return save_artifact(self, Path(path), force=force)

    @torch.no_grad()
    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` in float32 for a ``(B, T)`` batch of token ids."""
        return self.module(input_ids=token_ids).logits.float()

    def summary(self) -> dict[str, Any]:
        """Sizes and bits per weight, counted from what is actually stored."""
        keep = getattr(torch, self.recipe.keep_dtype) if self.recipe else None
        return size_summary(self.module, keep)


def _unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        key = t.data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen[key] = name
        out[name] = t
    return out


def quantized_tensor_names(module: nn.Module) -> set[str]:
    """State-dict names of every ``QuantLinear``'s stored codes and parameters: the tensors
    kept as they are (never cast to the keep dtype) and counted as quantized bytes."""
    return {f"{n}.{b}" for n, m in module.named_modules() if isinstance(m, QuantLinear)
            for b in m.quantized().tensors()}


def size_summary(module: nn.Module, keep_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Per-layer and whole-model accounting (a :func:`~edgequant.sizes.size_record`).

    ``bits_per_weight`` covers the quantized linear weights only (codes, scales, zeros, …);
    ``bits_per_weight_total`` divides every stored byte of the model by its parameter count.
    Unquantized float tensors count at ``keep_dtype`` (how an artifact stores them) when
    given, else at their in-memory dtype.
    """
    layers = {}
    q_bytes = q_params = 0
    for name, m in module.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        n = m.in_features * m.out_features
        b = m.nbytes
        layers[name] = {"scheme": m.scheme.name, "shape": [m.out_features, m.in_features],
                        "bits_per_weight": 8 * b / n, "nbytes": b}
        q_bytes += b
        q_params += n
    tensors = _unique_tensors(module)
    persistent = set(module.state_dict().keys())
    q_names = quantized_tensor_names(module)

    def stored_size(k: str, t: torch.Tensor) -> int:
        if keep_dtype is not None and k not in q_names and t.is_floating_point():
            return t.numel() * keep_dtype.itemsize
        return t.numel() * t.element_size()

    total_bytes = sum(stored_size(k, t) for k, t in tensors.items() if k in persistent)
    dense_params = sum(t.numel() for k, t in tensors.items()
                       if k in persistent and k not in q_names and t.is_floating_point())
    return size_record(num_params=dense_params + q_params, weight_bytes=total_bytes,
                       linear_params=q_params, linear_bytes=q_bytes, layers=layers,
                       quantized_layers=len(layers), quantized_params=q_params,
                       quantized_bytes=q_bytes)
