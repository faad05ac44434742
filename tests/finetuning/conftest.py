"""A tiny Llama that speaks SmolLM2's tokenizer (so real corpora and chat templates apply)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def tiny_smol(smol_tokenizer):
    """``Model``: random LlamaForCausalLM (hidden 32, 2 layers) over SmolLM2's 49,152 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgequant.models.model import Model

    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64,
                         vocab_size=len(smol_tokenizer), max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=smol_tokenizer.bos_token_id)
    torch.manual_seed(0)
    return Model(LlamaForCausalLM(config).eval(), smol_tokenizer, {"name": "tiny-smol"})
