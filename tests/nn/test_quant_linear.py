import pytest
import torch
import torch.nn.functional as F

from edgequant.errors import SchemeError
from edgequant.formats import QuantScheme, quantize_tensor
from edgequant.nn.quant_linear import QuantLinear
from edgequant.nn.recipe import Recipe


@pytest.mark.parametrize("scheme", ["w4g128", "w3g32-asym", "w8", "w2-tensor"])
def test_forward_is_dequantize_then_matmul(scheme):
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 200), torch.randn(48), torch.randn(3, 5, 200)
    qt = quantize_tensor(w, scheme)
    layer = QuantLinear(qt, b)
    torch.testing.assert_close(layer(x), F.linear(x, qt.dequantize(), b), rtol=0, atol=0)
    assert layer.nbytes == qt.nbytes
    assert set(layer.state_dict()) == set(qt.tensors()) | {"bias"}


def test_buffers_follow_dtype_of_input():
    qt = quantize_tensor(torch.randn(8, 64), "w4g32")
    layer = QuantLinear(qt)
    y = layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_recipe_targets_and_overrides():
    r = Recipe(scheme=QuantScheme.parse("w4g128"),
               overrides=(("*.mlp.down_proj", "w8"), ("lm_head", "w8"),
                          ("model.layers.0.*", "keep")))
    assert r.scheme_for("model.layers.1.self_attn.q_proj", in_blocks=True).name == "w4g128"
    assert r.scheme_for("model.layers.1.mlp.down_proj", in_blocks=True).name == "w8"
    assert r.scheme_for("model.layers.0.mlp.down_proj", in_blocks=True) is None  # last wins
    assert r.scheme_for("lm_head", in_blocks=False).name == "w8"
    assert Recipe().scheme_for("lm_head", in_blocks=False) is None  # 16-bit unless asked
    assert Recipe.from_dict(r.to_dict()) == r


def test_recipe_rejects_bad_override():
    with pytest.raises(SchemeError, match="valid examples"):
        Recipe(overrides=(("lm_head", "w4q9"),))
