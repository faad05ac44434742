"""Tiny engines with known output: a real transformers forward pass whose greedy next token
is a fixed function of the current one."""

from __future__ import annotations

import torch

from edgequant.engine.torch_engine import TorchEngine

from ..eval._tiny import byte_tokenizer, tiny_module

EOS = 257


def cycle_engine(text: str, then_eos: bool = False) -> TorchEngine:
    """A byte-level engine whose greedy continuation of any byte of ``text`` is the rest of
    ``text`` and then ``text`` again (or EOS, when ``then_eos``), one byte per token.

    ``text``'s UTF-8 bytes must be distinct. Attention and MLP outputs are zeroed, so the
    residual stream at a position is the current token's embedding; the LM head scores
    token ``v`` by how much that embedding looks like the embedding of the byte before
    ``v`` in the cycle. Multi-byte characters are split over tokens on purpose.
    """
    data = list(text.encode())
    assert len(set(data)) == len(data), "the cycle's bytes must be distinct"
    nxt = {a: b for a, b in zip(data, data[1:] + [EOS if then_eos else data[0]], strict=True)}
    if then_eos:
        nxt[EOS] = data[0]
    module = tiny_module(seed=1)
    with torch.no_grad():
        for layer in module.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = module.model.embed_tokens.weight
        unit = emb / emb.norm(dim=1, keepdim=True)
        head = torch.zeros_like(module.lm_head.weight)
        for a, b in nxt.items():
            head[b] = 40 * unit[a]
        module.lm_head.weight.copy_(head)
    return TorchEngine(module, byte_tokenizer(), name="cycle")
