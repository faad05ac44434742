"""The fine-tuning peers of ``benchmarks/finetune_peers.py``: torchao QAT prepare → convert on a
tiny Llama gives int4 codes that compute what the fake-quantized model did; peft QLoRA starts
as its bitsandbytes NF4 base exactly (B = 0) and its adapters receive gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def _tiny_llama(intermediate: int = 128) -> torch.nn.Module:
    """hidden 64 (bitsandbytes' CPU kernel wants rows in whole blocks of 64), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=intermediate, vocab_size=128,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_torchao_qat_prepare_convert_int4():
    pytest.importorskip("torchao")
    import finetune_peers as fp
    from torchao.quantization.qat import FakeQuantizedLinear

    model = _tiny_llama(intermediate=96)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="does not divide"):
        fp.prepare_torchao_qat(model, group_size=64)   # 96-wide down_proj rows: 64 refused
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    fp.prepare_torchao_qat(model, group_size=32)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("_proj.weight") for n in trainable)
    assert "lm_head.weight" not in trainable and "model.embed_tokens.weight" not in trainable
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    fp.convert_torchao_qat(model)
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())
    with torch.no_grad():
        real = model(input_ids=ids).logits
    assert torch.isfinite(real).all()
    torch.testing.assert_close(real, fake, rtol=1e-5, atol=1e-5)  # convert computes the same
    assert type(model.lm_head.weight) is torch.nn.Parameter   # lm_head stays float
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        w = model.model.layers[0].get_submodule(name).weight
        groups = w.dequantize().reshape(-1, 32)
        assert max(len(torch.unique(g)) for g in groups) <= 16   # int4: ≤ 16 values a group
        assert int(w.qdata.min()) >= -8 and int(w.qdata.max()) <= 7


def test_peft_qlora_zero_init_equals_bnb_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    import finetune_peers as fp

    _tiny_llama().save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    tuned = fp.prepare_peft_qlora(tmp_path)
    names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    # training first: bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the
    # first no-grad eval forward, and that kernel passes no gradient back
    tuned.train()
    tuned(input_ids=ids, use_cache=False).logits.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in tuned.named_parameters() if ".lora_B." in n}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    tuned.eval()
    base = fp.load_bnb_nf4(tmp_path)
    with torch.no_grad():
        assert torch.equal(tuned(input_ids=ids).logits, base(input_ids=ids).logits)
