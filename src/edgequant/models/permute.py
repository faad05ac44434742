"""An exact, seeded channel permutation: same function, no longer on the shipped 4-bit grid.

The zoo's real models come out of 4-bit GGUF files, so their weights sit exactly on a Q4_1 /
K-quant grid (blocks of 32 along each row). Any format with a float minimum per block of 32
would then re-encode them for free. Permuting channels that the network treats as an
unordered set keeps every logit (up to float rounding) while scattering each block's columns.

Permuted (all from the :class:`~edgequant.models.architectures.ArchSpec` dimension tags):

=========== =================================================================================
dimension   tensors
=========== =================================================================================
hidden      embedding columns, every hidden-size norm, input columns of q/k/v/gate/up and
            ``lm_head``, output rows (and biases) of o/down. One permutation for the model.
inter       gate/up rows (and biases), down columns. One permutation per block.
kv_value    v rows (and bias) inside each KV head, and the same order on the o columns of
            every query head that reads that KV head (GQA). One permutation per KV head.
=========== =================================================================================

Not permuted: q/k head features (RoPE pairs them; ``q_norm``/``k_norm`` act on them) and the
vocabulary. RMSNorm is invariant under a permutation of its input when its weight moves too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from .architectures import (
    HIDDEN,
    INTER,
    KV_VALUE,
    Q_VALUE,
    ArchSpec,
    block_list,
    is_tied,
    spec_for,
    weight_of,
)


def _randperm(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def _block_perms(dims: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-block index orders for ``inter``, ``kv_value`` and the matching ``q_value``."""
    hd, heads, kv = dims["head_dim"], dims["heads"], dims["kv_heads"]
    group = heads // kv
    head_perms = [_randperm(hd, gen) for _ in range(kv)]  # one per KV head
    kv_value = torch.cat([h * hd + p for h, p in enumerate(head_perms)])  # (kv*hd,)
    q_value = torch.cat([j * hd + head_perms[j // group] for j in range(heads)])  # (heads*hd,)
    return {INTER: _randperm(dims[INTER], gen), KV_VALUE: kv_value, Q_VALUE: q_value}


def _permute_linear(lin: nn.Linear, perm_in: torch.Tensor | None,
                    perm_out: torch.Tensor | None) -> None:
    W = lin.weight  # (out, in)
    if perm_out is not None:
        W.copy_(W[perm_out])
        if lin.bias is not None:
            lin.bias.copy_(lin.bias[perm_out])
    if perm_in is not None:
        W.copy_(W[:, perm_in])


def permutations(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The index orders :func:`permute_model` applies, keyed ``hidden`` and ``{i}.{tag}``.

    New tensor index ``c`` holds old index ``perm[c]``. Deterministic for a seed.
    """
    spec = spec_for(model)
    dims = spec.dims(model.config)
    gen = torch.Generator().manual_seed(seed)
    out = {HIDDEN: _randperm(dims[HIDDEN], gen)}
    for i in range(len(block_list(model, spec))):
        for tag, p in _block_perms(dims, gen).items():
            out[f"{i}.{tag}"] = p
    return out


@torch.no_grad()
def permute_model(model: nn.Module, seed: int) -> None:
    """Apply the seeded channel permutation to ``model`` in place.

    The model computes the same logits afterwards (to float rounding). Tied embeddings stay
    tied (the shared weight is permuted once).

    Args:
        model: a HF causal LM whose architecture has an ArchSpec.
        seed: the permutation's seed; the same seed gives the same permutation.

    Raises:
        UnsupportedArchitectureError: no table entry for the model.
    """
    spec = spec_for(model)
    perms = permutations(model, seed)
    _permute_model(model, spec, perms)


def _permute_model(model: nn.Module, spec: ArchSpec, perms: dict[str, torch.Tensor]) -> None:
    P = perms[HIDDEN]
    embed = weight_of(model, spec.embed)  # (vocab, hidden)
    tied = is_tied(model, spec)
    embed.copy_(embed[:, P])
    if not tied:
        _permute_linear(_linear(model, spec.lm_head), P, None)
    final = weight_of(model, spec.final_norm)
    final.copy_(final[P])
    for i, block in enumerate(block_list(model, spec)):
        local = {HIDDEN: P, **{tag: perms[f"{i}.{tag}"] for tag in (INTER, KV_VALUE, Q_VALUE)}}
        for norm in spec.block_norms:
            if norm.dim in local:
                w = weight_of(block, norm.path)
                w.copy_(w[local[norm.dim]])
        for role in spec.linears:
            lin = _linear(block, role.path)
            _permute_linear(lin, local.get(role.in_dim), local.get(role.out_dim))


def _linear(module: nn.Module, path: str) -> nn.Linear:
    lin = module.get_submodule(path)
    if not isinstance(lin, nn.Linear):
        raise UnsupportedArchitectureError(f"{path} is a {type(lin).__name__}, not nn.Linear")
    return lin
