"""The statistics engine: calibration activations, block by block, for every consumer.

Quantization (GPTQ's Hessians, AWQ/SmoothQuant's transforms, static int8 ranges), llama.cpp's
importance matrix and the GGUF GPTQ path all need the same thing: the inputs of each linear
layer on calibration text. This module is the one place that computes them:

1. :func:`capture_block_inputs` — block 0's input for every calibration batch, and each
   block's other forward arguments (rotary embeddings, masks), without running any block;
2. :func:`walk_blocks` — for each block in turn, hand its inputs to the caller (who may
   rewrite or quantize the block), then run the block to get the next block's inputs;
3. :func:`collect` — one pass of a block over its inputs with forward hooks on the chosen
   linears, accumulating the named statistics (``observers.stats``); linears fed the very same
   tensor (q/k/v after the attention norm, gate/up after the MLP norm) share one set of
   accumulators, so a Hessian is built once per distinct input.

:func:`collect_statistics` is the whole walk without quantizing (the original model's
statistics: the importance matrix, Hessians for the GGUF GPTQ export). Peak memory is one
block's working set plus the calibration activations (inputs and outputs of one block).
The block forwards run in the calibration's compute dtype (bf16 autocast where the CPU has
it); every statistic accumulates in float32 or float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data.calibration import Calibration
from .models.architectures import ArchSpec, block_list, spec_for
from .observers.stats import Statistic, make_statistics
from .progress import Progress, no_progress

MAX_BATCH = 8


@dataclass
class BlockInputs:
    """One block of the walk: what transforms and quantizers may use.

    Attributes:
        block: the block module (modified in place by the caller, if at all).
        index: its position; ``prefix`` its full module path plus a dot.
        inputs: per batch, the block's input hidden states ``(B, T, hidden)``.
        kwargs: the block's other forward arguments (the same for every batch).
        calib: the calibration set (its compute dtype runs the forwards).
    """

    block: nn.Module
    index: int
    prefix: str
    spec: ArchSpec
    inputs: list[torch.Tensor]
    kwargs: dict[str, Any]
    calib: Calibration

    def run(self, inputs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The block's outputs on ``inputs`` (default: its calibration inputs), in the
        compute dtype (a transform compares them with each other)."""
        with compute_context(self.calib):
            return [block_output(self.block(x, **self.kwargs)) for x in (inputs or self.inputs)]

    def outputs(self) -> list[torch.Tensor]:
        """The next block's inputs: this block's outputs in its inputs' dtype."""
        with compute_context(self.calib):
            return [block_output(self.block(x, **self.kwargs)).to(x.dtype) for x in self.inputs]

    @property
    def n_tokens(self) -> int:
        return sum(x.shape[0] * x.shape[1] for x in self.inputs)


def batches(tokens: torch.Tensor) -> list[torch.Tensor]:
    """Equal batches of at most :data:`MAX_BATCH` windows (equal shapes: the block kwargs
    recorded for batch 0 serve every batch)."""
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
            return hidden  # type: ignore[no-any-return]
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


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


def compute_context(calib: Calibration) -> contextlib.AbstractContextManager[Any]:
    """Autocast for the calibration forwards (a no-op in float32). Its weight cache stays off:
    transforms change weights in place between forwards (AWQ tries candidate scales, folding
    rescales norms and linears), and a cached bf16 copy would silently keep the old ones."""
    if calib.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=calib.dtype, cache_enabled=False)


@torch.no_grad()
def walk_blocks(module: nn.Module, calib: Calibration, progress: Progress = no_progress,
                what: str = "calibrating blocks") -> Iterator[BlockInputs]:
    """Yield each block with its calibration inputs; after the caller is done with it (it
    may have quantized it), run it to make the next block's inputs — so each block sees the
    outputs of the blocks before it as they now are."""
    spec = spec_for(module)
    blocks = block_list(module, spec)
    inputs, kwargs = capture_block_inputs(module, blocks, batches(calib.tokens))
    for i in progress(range(len(blocks)), len(blocks), what):
        item = BlockInputs(blocks[i], i, f"{spec.blocks}.{i}.", spec, inputs, kwargs[i], calib)
        yield item
        inputs = item.outputs()


@torch.no_grad()
def collect(item: BlockInputs, paths: Iterable[str], needs: frozenset[str] | set[str],
            config: Any = None) -> dict[str, dict[str, Statistic]]:
    """Run ``item.block`` over its inputs with hooks on the linears at ``paths`` (relative to
    the block) and return their accumulated statistics (see the module docstring for the
    sharing of identical inputs)."""
    block = item.block
    stats = {p: make_statistics(needs, int(block.get_submodule(p).in_features),  # type: ignore[arg-type]
                                config) for p in paths}
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

    handles = [block.get_submodule(p).register_forward_hook(hook(p)) for p in stats]
    try:
        with compute_context(item.calib):
            for x in item.inputs:
                block(x, **item.kwargs)
                fed.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def collect_statistics(module: nn.Module, calib: Calibration, needs: frozenset[str] | set[str],
                       progress: Progress = no_progress, config: Any = None
                       ) -> dict[str, dict[str, Statistic]]:
    """Statistics of every linear inside the blocks of the (unmodified) model, keyed by full
    module path. Linears that read one input share their accumulator objects."""
    out: dict[str, dict[str, Statistic]] = {}
    for item in walk_blocks(module, calib, progress, "collecting statistics"):
        paths = [r.path for r in item.spec.linears]
        for path, s in collect(item, paths, needs, config).items():
            out[item.prefix + path] = s
    return out
