"""Scale folding keeps every block's function exactly, on both architectures."""

import pytest
import torch

from edgequant.formats import quantize_tensor
from edgequant.methods.scaling import (
    FOLD_RULES,
    common_parent,
    fake_quantize,
    fold_groups,
    fold_scales,
)
from edgequant.models.architectures import block_list, spec_for

from .outliers import one_thread  # noqa: F401


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_groups_resolve_from_roles(fixture, request):
    module = request.getfixturevalue(fixture)
    spec = spec_for(module)
    groups = fold_groups(block_list(module)[0], spec)
    assert [g.roles for g in groups] == [r.linears for r in FOLD_RULES]
    assert [g.parent for g in groups] == ["self_attn", "self_attn.o_proj", "mlp",
                                          "mlp.down_proj"]
    attn_norm = {n.role: n.path for n in spec.block_norms}["attn_norm"]
    assert groups[0].source is block_list(module)[0].get_submodule(attn_norm)
    # 4 query heads read 2 KV heads of 16 features: o's input channel (j, d) ← v's (j // 2, d)
    o = groups[1]
    assert o.index is not None and o.index.shape == (64,)
    assert o.index[:16].tolist() == list(range(16)) and o.index[16:32].tolist() == list(range(16))
    assert o.index[32:48].tolist() == list(range(16, 32))
    only_norms = fold_groups(block_list(module)[0], spec, only_norm_sources=True)
    assert [g.roles for g in only_norms] == [("q", "k", "v"), ("gate", "up")]


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma3"])
def test_folding_is_exact(fixture, request):
    module = request.getfixturevalue(fixture)
    spec = spec_for(module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial norm weights, so a wrong (1 + w) fold would show
        for block in block_list(module):
            for n in spec.block_norms:
                w = block.get_submodule(n.path).weight
                w.copy_(torch.rand(w.shape, generator=gen) * 2 - 0.5)
    ids = torch.randint(4, 128, (2, 24), generator=gen)
    with torch.no_grad():
        before = module(input_ids=ids, output_hidden_states=True).hidden_states
        weights = {k: v.clone() for k, v in module.state_dict().items()}
        for block in block_list(module):
            for g in fold_groups(block, spec):
                fold_scales(g, torch.exp(torch.randn(g.n_source, generator=gen)))
        after = module(input_ids=ids, output_hidden_states=True).hidden_states
    changed = [k for k, v in module.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(changed) == 2 * (7 + 2)  # every linear and both folded norms, per block
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_common_parent():
    assert common_parent(["self_attn.q_proj", "self_attn.k_proj"]) == "self_attn"
    assert common_parent(["mlp.down_proj"]) == "mlp.down_proj"
    assert common_parent(["a.b.c", "a.b.d", "a.e"]) == "a"


@pytest.mark.parametrize("scheme", ["w3g32", "w4-asym", "nf4", "w8-tensor", "w4g48"])
def test_fake_quantize_is_rtn(scheme):
    w = torch.randn(24, 100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(fake_quantize(w, quantize_tensor(w, scheme).scheme),
                       quantize_tensor(w, scheme).dequantize())
