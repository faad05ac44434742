"""The tensor-role table: every role resolves on real module trees, with the right shapes,
and its GGUF names agree with gguf-py's own name map."""

from __future__ import annotations

import gguf
import pytest
import torch
from torch import nn

from edgequant.errors import UnsupportedArchitectureError
from edgequant.models import architectures as A


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                         max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(params=["tiny_llama", "tiny_gemma3", "qwen2"])
def tiny_model(request):
    return _tiny_qwen2() if request.param == "qwen2" else request.getfixturevalue(request.param)


def test_spec_for_model_and_config(tiny_llama, tiny_gemma3):
    assert A.spec_for(tiny_llama) is A.LLAMA
    assert A.spec_for(tiny_llama.config) is A.LLAMA
    assert A.spec_for(tiny_gemma3) is A.GEMMA3
    assert A.spec_for(_tiny_qwen2()) is A.LLAMA


def test_roles_resolve_with_declared_shapes(tiny_model):
    spec = A.spec_for(tiny_model)
    dims = spec.dims(tiny_model.config)
    blocks = A.block_list(tiny_model)
    assert len(blocks) == tiny_model.config.num_hidden_layers
    for block in blocks:
        for role in spec.linears:
            lin = block.get_submodule(role.path)
            assert isinstance(lin, nn.Linear), role
            assert tuple(lin.weight.shape) == (dims[role.out_dim], dims[role.in_dim]), role
        for norm in spec.block_norms:
            assert tuple(block.get_submodule(norm.path).weight.shape) == (dims[norm.dim],), norm
    embed = tiny_model.get_submodule(spec.embed).weight
    assert tuple(embed.shape) == (dims[A.VOCAB], dims[A.HIDDEN])
    assert tuple(tiny_model.get_submodule(spec.final_norm).weight.shape) == (dims[A.HIDDEN],)
    assert tuple(tiny_model.get_submodule(spec.lm_head).weight.shape) == tuple(embed.shape)


def test_gemma3_has_its_extra_norms(tiny_gemma3):
    roles = {n.role: n for n in A.GEMMA3.block_norms}
    assert {"post_attn_norm", "ffn_norm", "post_ffn_norm", "q_norm", "k_norm"} <= set(roles)
    assert roles["q_norm"].dim == A.HEAD_DIM and roles["ffn_norm"].dim == A.HIDDEN
    assert A.GEMMA3.gguf_norm_offset == 1.0


def test_linear_names_in_execution_order(tiny_llama):
    names = A.linear_names(tiny_llama)
    assert len(names) == 2 * 7
    assert names[:7] == [f"model.layers.0.{p}" for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert names[-1] == "model.layers.1.mlp.down_proj"
    assert all(isinstance(tiny_llama.get_submodule(n), nn.Linear) for n in names)


def test_gguf_names_match_gguf_py(tiny_model):
    """Our table's GGUF names are the ones gguf-py (llama.cpp's converter) derives."""
    spec = A.spec_for(tiny_model)
    arch_name = A.gguf_arch_for(tiny_model)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    ref = gguf.get_tensor_name_map(arch, tiny_model.config.num_hidden_layers)
    ours = spec.gguf_names(tiny_model)
    params = dict(tiny_model.named_parameters())  # a tied lm_head appears once, as embed
    assert set(ours) == set(params)
    for hf_name, gguf_name in ours.items():
        assert ref.get_name(hf_name, try_suffixes=(".weight", ".bias")) == gguf_name, hf_name


def test_gguf_name_lookup():
    assert A.LLAMA.gguf_name("q", layer=3) == "blk.3.attn_q.weight"
    assert A.LLAMA.gguf_name("v", layer=0, suffix="bias") == "blk.0.attn_v.bias"
    assert A.LLAMA.gguf_name("embed") == "token_embd.weight"
    assert A.GEMMA3.gguf_name("post_ffn_norm", layer=1) == "blk.1.post_ffw_norm.weight"
    with pytest.raises(ValueError):
        A.LLAMA.gguf_name("q")


def test_tied_and_rope_permute(tiny_llama, tiny_gemma3):
    assert not A.is_tied(tiny_llama)
    assert A.is_tied(tiny_gemma3)
    assert A.rope_permute_qk(tiny_llama)
    assert not A.rope_permute_qk(_tiny_qwen2())
    assert not A.rope_permute_qk(tiny_gemma3)


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    with pytest.raises(UnsupportedArchitectureError, match="llama.*gemma3_text"):
        A.spec_for(config)
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        A.linear_names(GPT2LMHeadModel(config))
