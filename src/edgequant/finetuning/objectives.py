"""Training objectives: next-token cross-entropy on the labelled tokens, and distillation from
the unquantized teacher (KL divergence to its distribution on the same tokens).

An objective is ``objective(module, batch) -> (loss, tokens)``; the loop averages micro-batch
losses. Positions: logits at ``t`` predict token ``t+1``, so a position counts when
``labels[:, t+1]`` is not ``IGNORE`` (text: every position; chat: the response's tokens).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE

OBJECTIVES = ("ce", "kd")


def _forward(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  use_cache=False).logits  # type: ignore[no-any-return]


def _targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    target = batch["labels"][:, 1:]
    return target, target != IGNORE


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the labelled positions, and their count."""
    target = labels[:, 1:]
    n = int((target != IGNORE).sum())
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss / max(n, 1), n


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of KL(p_teacher ‖ p_student), computed in float32 — the
    same direction as the KLD metric (``eval.kld``), so training lowers what is reported."""
    t = temperature
    s_logp = F.log_softmax(student[mask].float() / t, dim=-1)
    t_logp = F.log_softmax(teacher[mask].float() / t, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    return kl.mean() * (t * t)


class CrossEntropy:
    """Cross-entropy on the labelled tokens (chat: the assistant's)."""

    name = "ce"

    def __call__(self, module: nn.Module, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, int]:
        return cross_entropy(_forward(module, batch), batch["labels"])

    def describe(self) -> dict[str, Any]:
        return {"objective": "ce"}


class Distillation:
    """KL divergence to ``teacher``'s next-token distribution, teacher logits computed on the
    fly under ``no_grad`` (in the loop's autocast dtype), on the positions the labels mark."""

    name = "kd"

    def __init__(self, teacher: nn.Module, temperature: float = 1.0) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = temperature

    def __call__(self, module: nn.Module, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, int]:
        _, mask = _targets(batch)
        with torch.no_grad():
            t_logits = _forward(self.teacher, batch)[:, :-1]
        s_logits = _forward(module, batch)[:, :-1]
        n = int(mask.sum())
        return kl_to_teacher(s_logits, t_logits, mask, self.temperature), n

    def describe(self) -> dict[str, Any]:
        return {"objective": "kd", "temperature": self.temperature}
