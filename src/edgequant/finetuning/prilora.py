"""PRILoRA: LoRA whose rank grows linearly with depth, and whose ``A`` is pruned by importance.

* Ranks: layer ``l`` of ``L`` blocks gets ``round(r_min + (r_max − r_min)·l/(L−1))``
  (default 4 → 12, average 8): later blocks, which adapt more, get more.
* Pruning: every ``every`` steps (default 40), each adapter's ``A (r, in)`` is scored by
  ``|A_ij| · ‖X_j‖`` — ``‖X_j‖`` the norm of input feature ``j`` accumulated over the tokens
  seen since the last pruning — and, in each row, the ``ratio`` lowest-scoring entries are set
  to zero (they may grow back). The accumulators are part of the checkpoint.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .lora import LoraError, LoraLinear

_BLOCK = re.compile(r"\.(\d+)\.")


def depth_ranks(names: list[str], r_min: int = 4, r_max: int = 12) -> dict[str, int]:
    """Per layer name, its rank by block depth (the first ``.N.`` in the name)."""
    if r_min < 1 or r_max < r_min:
        raise LoraError(f"PRILoRA needs 1 <= r_min <= r_max, got {r_min}, {r_max}")
    depth = {}
    for n in names:
        m = _BLOCK.search(n)
        if m is None:
            raise LoraError(f"{n} is outside the numbered blocks; PRILoRA ranks by block depth")
        depth[n] = int(m[1])
    top = max(depth.values())
    return {n: round(r_min + (r_max - r_min) * d / top) if top else r_min
            for n, d in depth.items()}


def prune_mask(a: torch.Tensor, act_norm: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean ``(r, in)``: True for entries kept — per row, all but the ``ratio`` fraction
    with the lowest ``|A_ij|·‖X_j‖`` (ties broken by position)."""
    score = a.abs() * act_norm.unsqueeze(0)
    k = int(ratio * a.shape[1])
    keep = torch.ones_like(a, dtype=torch.bool)
    if k:
        low = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        keep.scatter_(1, low, False)
    return keep


class PriLoRA:
    """The pruning schedule, as the loop's ``extra`` (stateful, called after each step)."""

    def __init__(self, layers: dict[str, LoraLinear], every: int = 40,
                 ratio: float = 0.25) -> None:
        if every < 1 or not 0 <= ratio < 1:
            raise LoraError(f"PRILoRA needs every >= 1 and 0 <= ratio < 1, got {every}, {ratio}")
        self.layers, self.every, self.ratio = layers, every, ratio
        self.sq = {n: torch.zeros(m.in_features) for n, m in layers.items()}
        self.hooks = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if module.training:
                x = args[0].detach().float()
                self.sq[name] += x.pow(2).reshape(-1, x.shape[-1]).sum(0)
        return hook

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if step % self.every:
            return
        for name, m in self.layers.items():
            a = m.lora_A.weight
            a.mul_(prune_mask(a, self.sq[name].sqrt(), self.ratio).to(a.dtype))
            self.sq[name].zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"act_sq.{n}": t for n, t in self.sq.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for n in self.sq:
            self.sq[n].copy_(tensors[f"act_sq.{n}"])

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def trainable_count(layers: dict[str, LoraLinear]) -> int:
    return sum(m.r * (m.in_features + m.out_features) for m in layers.values())
