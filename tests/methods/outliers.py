"""Shared by the scale-folding method tests: tiny models with activation outlier channels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgequant.models.architectures import block_list, spec_for
from edgequant.models.model import Model

from ..helpers import tiny_tokenizer

OUTLIERS = {"attn_norm": {3: 25.0, 17: -18.0, 40: 30.0}, "ffn_norm": {5: 20.0, 33: 25.0}}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine run ~10x faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def wrap(module: nn.Module) -> Model:
    return Model(module, tiny_tokenizer(module.config.vocab_size), {"name": "tiny"})


@torch.no_grad()
def inject_outliers(module: nn.Module) -> nn.Module:
    """Give a few channels of every attn/ffn norm a large gain: outlier input channels for
    q/k/v and gate/up, as real LLMs have."""
    spec = spec_for(module)
    for block in block_list(module, spec):
        for norm in spec.block_norms:
            for ch, gain in OUTLIERS.get(norm.role, {}).items():
                block.get_submodule(norm.path).weight[ch] = gain - spec.gguf_norm_offset
    return module


def tokens(n: int, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output_error(model: Model, quantized: Model, ids: torch.Tensor) -> float:
    """Mean squared error of the last block's output (the residual stream) on ``ids``."""
    def last_hidden(m: Model) -> torch.Tensor:
        out = []
        block = block_list(m.module)[-1]
        h = block.register_forward_hook(lambda mod, a, o: out.append(o[0] if isinstance(o, tuple)
                                                                     else o))
        try:
            m.module(input_ids=ids, use_cache=False)
        finally:
            h.remove()
        return out[0]
    return float((last_hidden(model) - last_hidden(quantized)).pow(2).mean())
