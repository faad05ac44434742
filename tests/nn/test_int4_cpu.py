import pytest
import torch
import torch.nn.functional as F

from edgequant.formats import quantize_tensor
from edgequant.nn.int4_cpu import (
    FUSED_MAX_ROWS,
    Int4CpuLinear,
    kernel_group,
    prepare_for_inference,
    unpack_kernel_layout,
)
from edgequant.nn.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch has no int4 CPU kernel")


@pytest.mark.parametrize("n,k", [(64, 64), (192, 576), (128, 1536)])
def test_our_unpacking_inverts_torchs_packing(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_kernel_layout(packed, n, k).to(torch.int32), codes)


# (scheme, in_features): symmetric, asymmetric, float zero-point, per-channel, and a
# ragged last group (576 = 4·128 + 64) served by kernel groups of 64
CASES = [("w4g128", 512), ("w4g128-asym", 576), ("w4g64-asym-fz", 256), ("w4", 320),
         ("w4g32", 96)]


@pytest.mark.parametrize("scheme,k", CASES)
def test_weights_match_quant_linear_within_bf16_rounding(scheme, k):
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(128, k), scheme)
    ref = QuantLinear(qt).dequantized_weight()
    layer = Int4CpuLinear.from_quant_linear(QuantLinear(qt))
    scale = qt.params()["scales"].abs().max()
    # scale and z = (8 − zp)·s are rounded to bf16 (relative 2^-8): at most (7 + 8)·s·2^-8
    assert (layer.dequantized_weight() - ref).abs().max() <= 15 * scale * 2 ** -8


@pytest.mark.parametrize("scheme,k", CASES)
@pytest.mark.parametrize("rows", [1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, 40])
def test_forward_is_the_product_with_its_weights(scheme, k, rows):
    torch.manual_seed(1)
    qt = quantize_tensor(torch.randn(192, k), scheme)
    bias = torch.randn(192)
    layer = Int4CpuLinear.from_quant_linear(QuantLinear(qt, bias))
    x = torch.randn(rows, k)
    exact = F.linear(x, layer.dequantized_weight(), bias)
    y = layer(x.bfloat16())  # fused kernel up to FUSED_MAX_ROWS, dequantize + matmul above
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 192)
    assert (y.float() - exact).norm() / exact.norm() < 1e-2
    torch.testing.assert_close(layer(x), exact, rtol=1e-4, atol=1e-4)  # float32 path
    assert layer(x.bfloat16().view(1, rows, k)).shape == (1, rows, 192)


@pytest.mark.parametrize("scheme,shape", [("w3g128", (64, 256)), ("w8", (64, 256)),
                                          ("w4g128", (48, 256)), ("w4-tensor", (64, 256)),
                                          ("w4g128", (64, 200))])
def test_layers_the_kernel_cannot_run_are_refused(scheme, shape):
    layer = QuantLinear(quantize_tensor(torch.randn(*shape), scheme))
    assert kernel_group(layer) is None
    with pytest.raises(ValueError, match="int4 CPU kernel"):
        Int4CpuLinear.from_quant_linear(layer)


def test_prepared_model_keeps_its_outputs_and_cannot_be_saved():
    from transformers import LlamaConfig, LlamaForCausalLM

    import edgequant as eq

    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=192, vocab_size=160,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = eq.quantize(eq.Model(LlamaForCausalLM(config).eval(), None, {"name": "tiny"}),
                        "rtn", scheme="w4g64")
    ids = torch.randint(0, 160, (1, 12))
    want = model.module(input_ids=ids).logits
    n = prepare_for_inference(model.module.to(torch.bfloat16))
    assert n == 14  # 7 linears × 2 blocks; lm_head stays 16-bit
    got = model.module(input_ids=ids).logits.float()
    assert (got - want).norm() / want.norm() < 3e-2
    with pytest.raises(RuntimeError, match="inference-only"):
        model.module.state_dict()
