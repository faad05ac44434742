"""Shared fixtures: tiny in-memory models (fast, offline) and the zoo's real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def tiny_llama():
    """A tiny random LlamaForCausalLM (hidden 64, 2 layers, 4 heads / 2 KV heads), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_gemma3():
    """A tiny random Gemma3ForCausalLM (text; hidden 64, 2 layers, 4 heads / 2 KV heads,
    head_dim 16, tied embeddings), eval mode."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=96,
                              vocab_size=128, max_position_embeddings=256, sliding_window=16,
                              query_pre_attn_scalar=16)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The zoo's default real model as an HF checkpoint folder (pulled once, then cached)."""
    from edgequant.models import zoo

    return zoo.pull("smollm2-135m")


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    """The zoo's default model as the GGUF file it ships in (Q4_1, not permuted)."""
    from edgequant.models import zoo

    return zoo.fetch_gguf("smollm2-135m")


# Tests that take minutes each on 2 cores (Gemma 3's 1 GB checkpoint, a whole compare run,
# every peer tool on the real model): `make test-all` runs them, `make test` (CI) does not.
HEAVY = (
    "tests/comparison/test_e2e_real.py",
    "tests/backends/peers/test_peers_real.py",
    "test_gemma3_270m_matches_llama_cpps_converter",
    "test_gemma3_permuted_is_the_same_function",
    "test_checkpoint_tokenizer_matches_llama_cpp[gemma3-270m]",
    "test_gguf_source_matches_zoo_asis",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(h in item.nodeid for h in HEAVY):
            item.add_marker(pytest.mark.heavy)
