"""Exact input-channel scale folding, shared by AWQ and SmoothQuant.

A linear ``y = x Wᵀ`` computes the same thing as ``(x / s) (W diag(s))ᵀ`` for any positive
per-input-channel ``s``. When ``x`` is the output of an op that is linear per channel — a
norm's weight, or another linear's output rows — the ``1 / s`` can be folded into that op,
so the block's function is unchanged and only the weights the quantizer sees differ.

Fold groups are stated in linear/norm *roles* (``architectures.ArchSpec``), never module
names, and resolved per block:

===========  =================  ==============================================================
source       consumers          folding
===========  =================  ==============================================================
attn_norm    q, k, v            norm weight ``w ← w / s`` (Gemma: ``(off + w) / s − off``)
v            o                  v rows ``÷ s``; with grouped-query attention one scale per
                                KV channel, repeated over the query heads reading that KV head
ffn_norm     gate, up           norm weight, as above
up           down               up rows ``÷ s``
===========  =================  ==============================================================

The ``v → o`` fold is exact under GQA because attention mixes value vectors over *tokens*
only: query head ``j`` outputs a convex combination of KV head ``j // n_rep``'s values, so
scaling a KV channel by ``1/s`` scales that channel of every query head reading it by ``1/s``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..formats import QuantScheme, get_format
from ..formats.base import group, ungroup
from ..models.architectures import ArchSpec


@dataclass(frozen=True)
class FoldRule:
    """Consumers ``linears`` (roles) read ``source``'s output (a norm role or a linear role)."""

    source: str
    linears: tuple[str, ...]


FOLD_RULES: tuple[FoldRule, ...] = (
    FoldRule("attn_norm", ("q", "k", "v")),
    FoldRule("v", ("o",)),
    FoldRule("ffn_norm", ("gate", "up")),
    FoldRule("up", ("down",)),
)


@dataclass
class FoldGroup:
    """One rule resolved on a block.

    Attributes:
        source: the norm or linear whose output channels absorb ``1 / s``.
        source_is_norm: a norm (weight vector) rather than a linear (weight rows).
        norm_offset: the norm scales by ``offset + weight`` (Gemma: 1.0).
        roles / paths / linears: the consumers, block-relative paths, modules.
        parent: block-relative path of the smallest module holding every consumer (AWQ
            scores candidate scales on its output); a single consumer is its own parent.
        index: for each consumer input channel, the source channel feeding it (GQA
            ``v → o``), or None when they correspond one to one.
    """

    source: nn.Module
    source_is_norm: bool
    norm_offset: float
    roles: tuple[str, ...]
    paths: tuple[str, ...]
    linears: tuple[nn.Linear, ...]
    parent: str
    index: torch.Tensor | None = None

    @property
    def n_source(self) -> int:
        """Number of source channels (= independent scales)."""
        return int(tensor_attr(self.source, "weight").shape[0])

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Per-source-channel scales → per-consumer-input-channel scales."""
        return s if self.index is None else s[self.index.to(s.device)]

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Per-consumer-input-channel values → per-source-channel means (inverse of expand)."""
        if self.index is None:
            return v
        idx = self.index.to(v.device)
        out = torch.zeros(self.n_source, dtype=v.dtype, device=v.device).index_add_(0, idx, v)
        count = torch.zeros_like(out).index_add_(0, idx, torch.ones_like(v))
        return out / count


def tensor_attr(module: nn.Module, name: str) -> torch.Tensor:
    """``module.<name>`` as a tensor (a weight or bias), typed for mypy."""
    return cast(torch.Tensor, getattr(module, name))


def common_parent(paths: Sequence[str]) -> str:
    """The deepest dotted prefix shared by every path (a lone path is its own parent)."""
    if len(paths) == 1:
        return paths[0]
    parts = [p.split(".") for p in paths]
    prefix: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def find_config(block: nn.Module) -> Any:
    """The HF config a block's attention keeps (``self_attn.config``), if any."""
    for mod in block.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "num_attention_heads"):
            return cfg
    return None


def gqa_index(src_out: int, dst_in: int, config: Any, spec: ArchSpec) -> torch.Tensor | None:
    """For each attention-output channel (query head j, feature d), its value channel.

    Returns None when the shapes are not a GQA ``v → o`` pair this config explains.
    """
    if config is None:
        return None
    dims = spec.dims(config)
    heads, kv, hd = dims["heads"], dims["kv_heads"], dims["head_dim"]
    if src_out != kv * hd or dst_in != heads * hd or heads % kv:
        return None
    j = torch.arange(heads).repeat_interleave(hd)  # query head of each o input channel
    d = torch.arange(hd).repeat(heads)
    return (j // (heads // kv)) * hd + d


def fold_groups(block: nn.Module, spec: ArchSpec,
                rules: Sequence[FoldRule] = FOLD_RULES,
                only_norm_sources: bool = False) -> list[FoldGroup]:
    """Resolve ``rules`` on one block, skipping those whose shapes do not allow an exact fold.

    Args:
        block: one decoder block.
        spec: its architecture table.
        rules: fold rules by role (default: the four above).
        only_norm_sources: keep only norm-fed groups (SmoothQuant).
    """
    norms = {r.role: r.path for r in spec.block_norms}
    lins = {r.role: r.path for r in spec.linears}
    out: list[FoldGroup] = []
    for rule in rules:
        is_norm = rule.source in norms
        if only_norm_sources and not is_norm:
            continue
        if not is_norm and rule.source not in lins:
            continue
        if any(r not in lins for r in rule.linears):
            continue
        source = block.get_submodule(norms[rule.source] if is_norm else lins[rule.source])
        paths = tuple(lins[r] for r in rule.linears)
        linears = tuple(cast(nn.Linear, block.get_submodule(p)) for p in paths)
        n_in = linears[0].in_features
        if any(lin.in_features != n_in for lin in linears):
            continue
        index = None
        n_src = int(tensor_attr(source, "weight").shape[0])
        if n_src != n_in:
            if is_norm:
                continue
            index = gqa_index(n_src, n_in, find_config(block), spec)
            if index is None:
                continue
        out.append(FoldGroup(source, is_norm, spec.gguf_norm_offset if is_norm else 0.0,
                             rule.linears, paths, linears, common_parent(paths), index))
    return out


@torch.no_grad()
def fold_scales(g: FoldGroup, s: torch.Tensor) -> None:
    """Divide the source's output channels by ``s`` and multiply the consumers' input
    channels by it (exact in real arithmetic; fp32 rounding only)."""
    s = s.to(torch.float32)
    w = tensor_attr(g.source, "weight")
    if g.source_is_norm:
        w.copy_(((w.float() + g.norm_offset) / s - g.norm_offset).to(w.dtype))
    else:
        w.copy_((w.float() / s[:, None]).to(w.dtype))
    bias = getattr(g.source, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_((bias.float() / s).to(bias.dtype))
    s_in = g.expand(s)
    for lin in g.linears:
        lin.weight.copy_((lin.weight.float() * s_in[None, :]).to(lin.weight.dtype))


def fake_quantize(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequantize(quantize(w))`` under ``scheme`` without packing: the RTN values."""
    fmt = get_format(scheme.format)
    xg = group(w.detach().to(torch.float32), scheme)
    params = fmt.params(xg, scheme)
    return ungroup(fmt.decode(fmt.encode(xg, params, scheme), params, scheme),
                   tuple(w.shape))  # type: ignore[arg-type]


# --------------------------------------------------------------------- observing a block
@dataclass
class Captured:
    """A module's calls during one pass over the calibration batches."""

    args: list[tuple[Any, ...]]
    kwargs: list[dict[str, Any]]
    outputs: list[torch.Tensor]

    def keep(self, n: int) -> None:
        """Forget all but the first ``n`` calls."""
        del self.args[n:], self.kwargs[n:], self.outputs[n:]

    def rerun(self, module: nn.Module) -> list[torch.Tensor]:
        return [_first(module(*a, **k)) for a, k in zip(self.args, self.kwargs, strict=True)]


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def observe(block: nn.Module, run: Callable[[], Any], capture: str | None = None,
            inputs_of: dict[str, Callable[[torch.Tensor], None]] | None = None) -> Captured:
    """Run ``run()`` (a pass of ``block`` over the batches) recording the calls of the
    submodule ``capture`` and feeding every input of each submodule in ``inputs_of`` to its
    callback (``(..., in_features)`` tensors)."""
    cap = Captured([], [], [])
    handles = []
    if capture is not None:
        mod = block.get_submodule(capture)

        def pre(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            cap.args.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a
                                  for a in args))
            cap.kwargs.append(dict(kwargs))

        def post(m: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            cap.outputs.append(_first(out).detach())

        handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(mod.register_forward_hook(post, with_kwargs=True))
    for path, fn in (inputs_of or {}).items():
        def hook(m: nn.Module, args: tuple[Any, ...], fn: Callable[..., None] = fn) -> None:
            fn(args[0].detach())
        handles.append(block.get_submodule(path).register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return cap
