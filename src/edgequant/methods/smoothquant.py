"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then W8A8.

Per-token int8 activations fail where a few input channels are far larger than the rest.
For each group of linears fed by a norm (q/k/v after ``attn_norm``, gate/up after
``ffn_norm`` — the paper's and llm-compressor's mappings) SmoothQuant picks

    s_j = max|X_j|^α / max|W_j|^(1−α)        (α = 0.5 by default)

with ``max|W_j|`` over every row of every linear of the group, divides the norm's weight by
``s`` and multiplies the linears' input columns by it (``scaling.fold_scales``: exact).
Then weights are int8 per output channel and activations int8 per token (scheme ``w8a8``)
or per tensor with a calibrated min-max range (``w8a8-static``), in ``W8A8Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import SchemeError
from ..formats import QuantScheme
from ..observers.stats import AbsMax
from .registry import Transform, register
from .scaling import fold_groups, fold_scales, observe

if TYPE_CHECKING:
    from ..pipeline import BlockContext

EPS = 1e-5


@dataclass(frozen=True)
class SmoothQuantConfig:
    """Options of SmoothQuant.

    Attributes:
        alpha: migration strength in ``[0, 1]``: 0 leaves activations alone, 1 moves all of
            their range into the weights.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise SchemeError(f"smoothquant alpha must lie in [0, 1], not {self.alpha}")


def smooth_scales(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``, kept away from zero (shapes ``(in,)``)."""
    s = x_absmax.float().pow(alpha) / w_absmax.float().clamp(min=EPS).pow(1 - alpha)
    return s.clamp(min=EPS)


@torch.no_grad()
def smoothquant_transform(block: nn.Module, ctx: BlockContext) -> None:
    """Fold SmoothQuant scales into every norm-fed group of ``block`` that has a quantized
    linear, from one pass over the block's calibration inputs."""
    cfg: SmoothQuantConfig = ctx.config
    groups = [g for g in fold_groups(block, ctx.spec, only_norm_sources=True)
              if any(p in ctx.schemes for p in g.paths)]
    if not groups:
        return
    stats = {g.paths[0]: AbsMax(g.linears[0].in_features) for g in groups}
    observe(block, ctx.run, inputs_of={p: st.update for p, st in stats.items()})
    for g in groups:
        w_absmax = torch.cat([lin.weight.detach().abs().float() for lin in g.linears]).amax(0)
        fold_scales(g, smooth_scales(stats[g.paths[0]].result(), w_absmax, cfg.alpha))


def int8_quantizer(scheme: QuantScheme) -> str:
    """Static activation ranges (``w8a8-static``) need the calibrated int8 quantizer."""
    return "static" if scheme.act_bits is not None and not scheme.act_dynamic else "dynamic"


register(Transform(
    "smoothquant", smoothquant_transform, SmoothQuantConfig, default_quantizer=int8_quantizer,
    aliases=("sq",),
    description="SmoothQuant: migrate activation outliers into weights (alpha), then int8 "
                "weights and activations (w8a8 per token, w8a8-static per tensor)"))
