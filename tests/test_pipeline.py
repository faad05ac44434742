import pytest
import torch

import edgequant as eq
from edgequant.errors import WeightError
from edgequant.models.model import Model
from edgequant.nn.quant_linear import QuantLinear

from .helpers import tiny_tokenizer


def wrap(module):
    return Model(module, tiny_tokenizer(module.config.vocab_size), {"name": "tiny"})


def logits(module, ids):
    with torch.no_grad():
        return module(input_ids=ids).logits


def test_rtn_quantizes_every_block_linear_and_keeps_the_head(tiny_llama):
    q = eq.quantize(wrap(tiny_llama), "rtn", scheme="w4g32")
    qnames = {n for n, m in q.module.named_modules() if isinstance(m, QuantLinear)}
    assert len(qnames) == 2 * 7 and "lm_head" not in qnames
    assert set(q.layers) == qnames
    # the input model is untouched
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama.modules())
    s = q.summary()
    assert s["quantized_layers"] == 14
    # 64-wide rows in groups of 32 with fp16 scales; down_proj has 96 columns: 3 groups
    assert 4.5 <= s["bits_per_weight"] <= 4.5 + 1e-9


def test_error_shrinks_with_bits(tiny_llama):
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    ref = logits(tiny_llama, ids)
    errs = [(logits(eq.quantize(wrap(tiny_llama), "rtn", scheme=s).module, ids) - ref)
            .abs().mean().item() for s in ("w8", "w4g32", "w2g32")]
    assert errs[0] < errs[1] < errs[2]


def test_head_override_and_keep(tiny_gemma3):
    q = eq.quantize(wrap(tiny_gemma3), "rtn", scheme="w4g32",
                    overrides=(("lm_head", "w8"), ("*.layers.0.*", "keep")))
    assert isinstance(q.module.lm_head, QuantLinear)
    # the tied input embedding is not quantized with the head
    emb = q.module.get_input_embeddings().weight
    torch.testing.assert_close(emb, tiny_gemma3.get_input_embeddings().weight.half().float())
    assert not any(n.startswith("model.layers.0.") for n in q.layers)


def test_nan_weight_names_the_layer(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(WeightError, match=r"model\.layers\.1\.mlp\.up_proj"):
        eq.quantize(wrap(tiny_llama), "rtn", scheme="w4g32")


def test_all_zero_layer_gives_exact_zeros(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.k_proj.weight.zero_()
    q = eq.quantize(wrap(tiny_llama), "rtn", scheme="w3g32-asym")
    w = q.module.model.layers[0].self_attn.k_proj.dequantized_weight()
    assert torch.isfinite(q.module.model.layers[0].self_attn.k_proj.scales.float()).all()
    assert torch.equal(w, torch.zeros_like(w))


def test_unknown_method_lists_methods(tiny_llama):
    with pytest.raises(eq.EdgequantError, match="quantizers: .*rtn"):
        eq.quantize(wrap(tiny_llama), "nonsense", scheme="w4g32")


def test_weight_only_method_refuses_activation_scheme(tiny_llama):
    with pytest.raises(eq.EdgequantError, match="dynamic, static or smoothquant"):
        eq.quantize(wrap(tiny_llama), "rtn", scheme="w8a8")
