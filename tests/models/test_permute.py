"""The grid-breaking permutation: exact same function, deterministic per seed, data-driven."""

from __future__ import annotations

import copy

import pytest
import torch

from edgequant.errors import UnsupportedArchitectureError
from edgequant.models import architectures as A
from edgequant.models.permute import permutations, permute_model

TOKENS = torch.tensor([[3, 17, 42, 99, 5, 64, 120, 7, 1, 88, 23, 56]])


def _tiny(kind: str, tied: bool, request) -> torch.nn.Module:
    if kind == "qwen2":  # q/k/v biases
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                             max_position_embeddings=256, tie_word_embeddings=tied)
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).eval()
    if tied == (kind == "tiny_gemma3"):  # the fixtures' own tying
        return request.getfixturevalue(kind)
    model = request.getfixturevalue(kind)
    model.config.tie_word_embeddings = tied
    cls = type(model)
    torch.manual_seed(0)
    return cls(model.config).eval()


def _randomize(model: torch.nn.Module) -> None:
    """Give norms and biases distinct values: a permutation that forgot one must fail."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.5 * torch.randn(p.shape, generator=gen))


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(TOKENS).logits


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gemma3", "qwen2"])
def test_same_function(kind, tied, request):
    model = _tiny(kind, tied, request)
    _randomize(model)
    assert A.is_tied(model) == tied
    before = _logits(model)
    original = copy.deepcopy(model.state_dict())
    permute_model(model, seed=0)
    after = _logits(model)
    assert (after - before).abs().max().item() < 1e-5
    assert A.is_tied(model) == tied
    spec = A.spec_for(model)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    for r in spec.linears:  # every linear moved (q/k through their input columns)
        assert f"model.layers.0.{r.path}.weight" in changed, r.path


def test_a_wrong_permutation_is_caught(tiny_llama):
    """Guard for the test above: permuting one norm alone changes the logits."""
    _randomize(tiny_llama)
    before = _logits(tiny_llama)
    with torch.no_grad():
        w = tiny_llama.model.layers[0].input_layernorm.weight
        w.copy_(w.flip(0))
    assert (_logits(tiny_llama) - before).abs().max().item() > 1e-3


def test_exact_index_relations(tiny_gemma3):
    model = tiny_gemma3
    _randomize(model)
    old = copy.deepcopy(model.state_dict())
    perms = permutations(model, seed=3)
    permute_model(model, seed=3)
    new = model.state_dict()
    P, Q, V, O = perms["hidden"], perms["1.inter"], perms["1.kv_value"], perms["1.q_value"]
    pre = "model.layers.1."
    assert torch.equal(new["model.embed_tokens.weight"], old["model.embed_tokens.weight"][:, P])
    down = pre + "mlp.down_proj.weight"
    assert torch.equal(new[down], old[down][P][:, Q])
    assert torch.equal(new[pre + "mlp.up_proj.weight"], old[pre + "mlp.up_proj.weight"][Q][:, P])
    assert torch.equal(new[pre + "self_attn.v_proj.weight"],
                       old[pre + "self_attn.v_proj.weight"][V][:, P])
    assert torch.equal(new[pre + "self_attn.o_proj.weight"],
                       old[pre + "self_attn.o_proj.weight"][P][:, O])
    assert torch.equal(new[pre + "self_attn.q_proj.weight"],  # rows (RoPE pairs) untouched
                       old[pre + "self_attn.q_proj.weight"][:, P])
    for k in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        assert torch.equal(new[pre + k], old[pre + k])
    assert torch.equal(new[pre + "post_feedforward_layernorm.weight"],
                       old[pre + "post_feedforward_layernorm.weight"][P])
    hd, group = 16, 2  # GQA: query heads 0,1 read KV head 0; heads 2,3 read KV head 1
    for j in range(4):
        h = j // group
        assert torch.equal(O[j * hd:(j + 1) * hd] - j * hd, V[h * hd:(h + 1) * hd] - h * hd)


def test_deterministic_per_seed(tiny_llama):
    a, b, c = (copy.deepcopy(tiny_llama) for _ in range(3))
    permute_model(a, seed=7)
    permute_model(b, seed=7)
    permute_model(c, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"],
                           sc["model.layers.0.mlp.up_proj.weight"])
    pa, pc = permutations(tiny_llama, 7), permutations(tiny_llama, 8)
    assert not torch.equal(pa["hidden"], pc["hidden"])


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                       n_positions=32))
    with pytest.raises(UnsupportedArchitectureError):
        permute_model(model, seed=0)
