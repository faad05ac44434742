"""Model surgery: find the layers a recipe targets, swap them for ``QuantLinear``, and round
every tensor that stays unquantized to the recipe's storage dtype — so the model in memory
computes exactly what its saved artifact will.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import SchemeError
from ..formats import QuantScheme
from ..models.architectures import linear_names
from ..recipe import KEEP_DTYPES, Recipe


def plan_layers(model: nn.Module, recipe: Recipe) -> dict[str, QuantScheme]:
    """Linear layers to quantize, in execution order, with their schemes."""
    in_blocks = linear_names(model)
    block_set = set(in_blocks)
    others = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n not in block_set]
    plan: dict[str, QuantScheme] = {}
    for name in [*in_blocks, *others]:
        scheme = recipe.scheme_for(name, in_blocks=name in block_set)
        if scheme is not None:
            plan[name] = scheme
    return plan


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def untie_if_needed(model: Any, plan: dict[str, QuantScheme]) -> None:
    """Quantizing a tied lm_head must not quantize the input embeddings with it (``model``:
    a transformers causal LM)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or inp is None or out.weight is not inp.weight:
        return
    head = next((n for n, m in model.named_modules() if m is out), None)
    if head in plan:
        out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def round_kept_tensors(model: nn.Module, keep_dtype: str, skip: set[str] | None = None) -> None:
    """Round every float parameter through ``keep_dtype``, except those named in ``skip``
    (the weights about to be quantized; ``QuantLinear`` codes are buffers, never touched)."""
    if keep_dtype not in KEEP_DTYPES:
        raise SchemeError(f"keep_dtype must be one of {KEEP_DTYPES}")
    dt = getattr(torch, keep_dtype)
    if dt == torch.float32:
        return
    limit = torch.finfo(dt).max
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or name in (skip or ()):
                continue
            if p.abs().max() > limit:
                raise SchemeError(f"{name} exceeds the {keep_dtype} range; "
                                  f"use keep_dtype bfloat16 or float32")
            p.copy_(p.to(dt).to(p.dtype))

