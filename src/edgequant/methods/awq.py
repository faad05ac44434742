"""AWQ (Lin et al., 2024): activation-aware weight scaling and clipping, then RTN.

Per block, following AutoAWQ's recipe:

1. **Scale search.** For each fold group (``scaling.FOLD_RULES``: q/k/v ← attn_norm,
   o ← v, gate/up ← ffn_norm, down ← up) with ``x̄`` = mean |x| per input channel::

       for α in 0, 1/n, …, (n−1)/n:              (n = 20)
           s = x̄^α                               (duo: x̄^α / w̄^(1−α), w̄ = mean of |W|
           s = s / sqrt(max(s)·min(s))            normalised per quantization group)
           W' = Q(W · s) / s                      Q = RTN under the layer's scheme
           err = MSE(parent(x; W') − parent(x; W))

   ``parent`` is the smallest module holding the group (self_attn for q/k/v, mlp for
   gate/up, the linear itself for o and down). The best ``s`` is folded exactly
   (``scaling.fold_scales``). The first candidate is ``s = 1`` (α = 0; with duo scaling it
   replaces the α = 0 point, as llm-compressor does), so no group gets worse than RTN on
   the calibration data. With grouped-query attention the o ← v scales are one per KV channel,
   repeated over the query heads that read it (exact; AutoAWQ skips o then).
2. **Clip search.** Per linear except q/k (their error passes through qkᵀ), per
   quantization group: shrink the group's max|w| by ``1 − i/20`` for i < 10, keep the
   shrink minimising the group's output MSE on ~512 sampled input tokens, clamp W there.
3. The pipeline then quantizes the transformed weights with RTN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SchemeError
from ..formats import QuantScheme
from ..formats.base import group, ungroup
from ..observers.stats import AbsMean
from .registry import Transform, register
from .scaling import FoldGroup, fake_quantize, fold_groups, fold_scales, observe, tensor_attr

if TYPE_CHECKING:
    from ..pipeline import BlockContext


@dataclass(frozen=True)
class AWQConfig:
    """Options of AWQ (defaults as AutoAWQ's, except ``duo_scaling``).

    Attributes:
        n_grid: exponents searched, ``α = i / n_grid`` for ``i < n_grid``.
        duo_scaling: ``s = x̄^α / w̄^(1−α)`` (AutoAWQ's default) instead of the paper's
            ``s = x̄^α``.
        clip: run the clip search after scaling.
        clip_grid: shrink step is ``1 / clip_grid`` of the group's max.
        max_shrink: largest shrink tried (0.5: down to half the max).
        clip_tokens: about this many input tokens are sampled for the clip search.
        clip_skip: linear roles never clipped.
        search_samples: score the scale grid on at most about this many calibration windows
            (whole batches; None: all, as AutoAWQ). The grid search costs 20 forward passes
            of each parent per block, so on a CPU this trades search fidelity for time;
            activation means always use every window.
    """

    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_tokens: int = 512
    clip_skip: tuple[str, ...] = ("q", "k")
    search_samples: int | None = None

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1 or self.clip_tokens < 1:
            raise SchemeError("awq: n_grid, clip_grid and clip_tokens must be positive")
        if self.search_samples is not None and self.search_samples < 1:
            raise SchemeError("awq: search_samples must be positive (or None for all)")
        if not 0.0 <= self.max_shrink < 1.0:
            raise SchemeError(f"awq: max_shrink must lie in [0, 1), not {self.max_shrink}")
        object.__setattr__(self, "clip_skip", tuple(self.clip_skip))


# ------------------------------------------------------------------------ scale search
def weight_mean(g: FoldGroup, schemes: dict[str, QuantScheme]) -> torch.Tensor:
    """Mean over all rows of the group of |w| / max|w| of its quantization group, per input
    channel (AutoAWQ's ``w_mean``)."""
    default = next(schemes[p] for p in g.paths if p in schemes)
    total = torch.zeros(g.linears[0].in_features, device=g.linears[0].weight.device)
    rows = 0
    for path, lin in zip(g.paths, g.linears, strict=True):
        w = lin.weight.detach().float().abs()
        wg = group(w, schemes.get(path, default))
        wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
        total += ungroup(wg, tuple(w.shape)).sum(0)  # type: ignore[arg-type]
        rows += w.shape[0]
    return total / rows


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None,
                     alpha: float) -> torch.Tensor:
    """One grid point's scales, normalised to ``sqrt(max · min) = 1``."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def mse(ref: list[torch.Tensor], out: list[torch.Tensor]) -> float:
    """Mean squared difference; float32 rows summed in float64 (exact enough to rank the
    grid, and a third of the search's time when every element was cast to float64)."""
    err = 0.0
    for a, b in zip(ref, out, strict=True):
        d = a.float() - b.float()
        err += float(d.square_().sum(dim=-1).sum(dtype=torch.float64))
    return err / sum(a.numel() for a in ref)


@torch.no_grad()
def search_scale(block: nn.Module, g: FoldGroup, ctx: BlockContext,
                 cfg: AWQConfig) -> tuple[torch.Tensor, float, float]:
    """The best scales for one fold group, the parent-output MSE at s = 1, and at the best."""
    x_abs = AbsMean(g.linears[0].in_features)
    cap = observe(block, ctx.run, capture=g.parent, inputs_of={g.paths[0]: x_abs.update})
    if cfg.search_samples is not None:
        sizes = torch.tensor([x.shape[0] for x in ctx.inputs]).cumsum(0)
        cap.keep(int((sizes < cfg.search_samples).sum()) + 1)
    parent = block.get_submodule(g.parent)
    x_mean = g.reduce(x_abs.result())
    w_mean = g.reduce(weight_mean(g, ctx.schemes)) if cfg.duo_scaling else None
    originals = [lin.weight.detach().clone() for lin in g.linears]
    best, best_err, base_err = torch.ones_like(x_mean), math.inf, math.inf
    try:
        for i in range(cfg.n_grid):  # i = 0 is s = 1 (with duo too, as llm-compressor)
            s = candidate_scales(x_mean, w_mean, i / cfg.n_grid) if i else torch.ones_like(x_mean)
            s_in = g.expand(s)[None, :]
            for path, lin, w0 in zip(g.paths, g.linears, originals, strict=True):
                if path in ctx.schemes:
                    w = fake_quantize(w0.float() * s_in, ctx.schemes[path]) / s_in
                    lin.weight.copy_(w.to(lin.weight.dtype))
            err = mse(cap.outputs, cap.rerun(parent))
            if i == 0:
                base_err = err
            if err < best_err:
                best, best_err = s, err
    finally:
        for lin, w0 in zip(g.linears, originals, strict=True):
            lin.weight.copy_(w0)
    return best, base_err, best_err


# ------------------------------------------------------------------------- clip search
class TokenSample:
    """Every ``step``-th input row across all batches, ``(n, in_features)``."""

    def __init__(self, step: int) -> None:
        self.step, self.seen, self.rows = step, 0, []  # type: ignore[var-annotated]

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.rows.append(x[(-self.seen) % self.step::self.step].float())
        self.seen += x.shape[0]

    def result(self) -> torch.Tensor:
        return torch.cat(self.rows)


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme,
                cfg: AWQConfig) -> torch.Tensor:
    """``w`` clamped per quantization group to the shrink of max|w| that minimises the
    group's output MSE on input rows ``x`` after RTN under ``scheme``.

    Shapes: w (R, C), x (n, C); grouped as w (R, G, g), x (G, n, g). With per-tensor scales
    the groups are not independent, so one shrink is chosen for the whole tensor.
    """
    rows, cols = w.shape
    gsize = scheme.group_size if scheme.granularity == "group" else cols
    assert gsize is not None
    n_groups = math.ceil(cols / gsize)
    pad = n_groups * gsize - cols

    def grouped(v: torch.Tensor) -> torch.Tensor:  # (*, C) -> (*, G, g), zero-padded
        v = F.pad(v, (0, pad)) if pad else v
        return v.reshape(*v.shape[:-1], n_groups, gsize)

    wg = grouped(w.float())
    xg = grouped(x.float()).transpose(0, 1)  # (G, n, g)

    def outputs(wq: torch.Tensor) -> torch.Tensor:  # (G, n, R)
        return torch.bmm(xg, wq.permute(1, 2, 0))

    reference = outputs(wg)
    amax = wg.abs().amax(-1, keepdim=True)  # (R, G, 1)
    best = amax.clone()
    min_err = torch.full((rows, n_groups), math.inf, device=w.device)
    for i in range(int(cfg.max_shrink * cfg.clip_grid)):
        limit = amax * (1 - i / cfg.clip_grid)
        clipped = torch.maximum(torch.minimum(wg, limit), -limit)
        q = fake_quantize(clipped.reshape(rows, -1)[:, :cols], scheme)
        err = (outputs(grouped(q)) - reference).pow(2).mean(1).T  # (R, G)
        if scheme.granularity == "tensor":
            err = err.sum().expand(rows, n_groups)
        better = err < min_err
        min_err = torch.where(better, err, min_err)
        best = torch.where(better[..., None], limit, best)
    clipped = torch.maximum(torch.minimum(wg, best), -best)
    return clipped.reshape(rows, -1)[:, :cols].to(w.dtype)


@torch.no_grad()
def clip_block(block: nn.Module, ctx: BlockContext, cfg: AWQConfig) -> None:
    """Run the clip search on every quantized linear of ``block`` not in ``clip_skip``."""
    paths = [r.path for r in ctx.spec.linears
             if r.path in ctx.schemes and r.role not in cfg.clip_skip]
    if not paths:
        return
    n_tokens = sum(x.shape[0] * x.shape[1] for x in ctx.inputs)
    samples = {p: TokenSample(max(1, n_tokens // cfg.clip_tokens)) for p in paths}
    observe(block, ctx.run, inputs_of={p: s.update for p, s in samples.items()})
    for p in paths:
        w = tensor_attr(block.get_submodule(p), "weight")
        w.copy_(search_clip(w.detach(), samples[p].result(), ctx.schemes[p], cfg))


# --------------------------------------------------------------------------- transform
@torch.no_grad()
def awq_transform(block: nn.Module, ctx: BlockContext) -> None:
    """Scale search and fold for every group with a quantized linear, then clip search."""
    cfg: AWQConfig = ctx.config
    for path, scheme in ctx.schemes.items():
        if not scheme.is_weight_only:
            raise SchemeError(f"awq quantizes weights only; {path} asks for {scheme.name} "
                              f"(for int8 activations use smoothquant)")
    for g in fold_groups(block, ctx.spec):
        if any(p in ctx.schemes for p in g.paths):
            s, _, _ = search_scale(block, g, ctx, cfg)
            fold_scales(g, s)
    if cfg.clip:
        clip_block(block, ctx, cfg)


register(Transform(
    "awq", awq_transform, AWQConfig,
    description="activation-aware weight scaling and clip search (AWQ); then round to "
                "nearest unless a quantizer follows (awq+gptq)"))
