"""int4_cpu: torch's layout as we read it, weights and products within bf16 rounding of the
reference, the layers it refuses (with reasons), and a prepacked model."""

import pytest
import torch
import torch.nn.functional as F

from edgequant.formats import quantize_tensor
from edgequant.kernels import KernelError, LayerSpec, get_kernel, use_kernels
from edgequant.kernels.int4_cpu import FUSED_MAX_ROWS, kernel_available, unpack_kernel_layout

pytestmark = pytest.mark.skipif(not kernel_available(), reason="this torch has no int4 CPU kernel")
KERNEL = get_kernel("int4_cpu")


def _spec(qt, dtype=torch.bfloat16, device="cpu"):
    return LayerSpec(qt.scheme, qt.shape, dtype, device, qt.g_idx is not None)


@pytest.mark.parametrize("n,k", [(64, 64), (192, 576), (128, 1536)])
def test_our_unpacking_inverts_torchs_packing(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_kernel_layout(packed, n, k).to(torch.int32), codes)


def test_self_check_passes():
    assert KERNEL.self_check() is None


# (scheme, in_features): symmetric, asymmetric, float zero-point, per-channel, and a
# ragged last group (576 = 4·128 + 64) served by kernel groups of 64
CASES = [("w4g128", 512), ("w4g128-asym", 576), ("w4g64-asym-fz", 256), ("w4", 320),
         ("w4g32", 96)]


@pytest.mark.parametrize("scheme,k", CASES)
def test_weights_match_the_reference_within_bf16_rounding(scheme, k):
    torch.manual_seed(0)
    qt = quantize_tensor(torch.randn(128, k), scheme)
    assert KERNEL.supports(_spec(qt)) is None
    packed = KERNEL.prepack(qt, _spec(qt))
    scale = qt.params()["scales"].abs().max()
    # scale and z = (8 − zp)·s are rounded to bf16 (relative 2^-8): at most (7 + 8)·s·2^-8
    err = KERNEL.dequantize(packed, torch.float32) - qt.dequantize()
    assert err.abs().max() <= 15 * scale * 2 ** -8
    # the layout holds the codes exactly: 4 bits each
    codes = unpack_kernel_layout(packed.tensors["codes"], *qt.shape)
    assert torch.equal(codes, qt.unpacked_codes())
    assert packed.tensors["codes"].numel() == qt.codes.numel()


@pytest.mark.parametrize("scheme,k", CASES)
@pytest.mark.parametrize("rows", [1, FUSED_MAX_ROWS, FUSED_MAX_ROWS + 1, 40])
def test_matmul_is_the_product_with_its_weights(scheme, k, rows):
    torch.manual_seed(1)
    qt = quantize_tensor(torch.randn(192, k), scheme)
    bias = torch.randn(192)
    packed = KERNEL.prepack(qt, _spec(qt))
    x = torch.randn(rows, k)
    exact = F.linear(x, KERNEL.dequantize(packed, torch.float32), bias)
    y = KERNEL.matmul(x.bfloat16(), packed, bias)  # fused up to FUSED_MAX_ROWS, dense above
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 192)
    assert (y.float() - exact).norm() / exact.norm() < 1e-2
    torch.testing.assert_close(KERNEL.matmul(x, packed, bias), exact, rtol=1e-4, atol=1e-4)
    assert KERNEL.matmul(x.bfloat16().view(1, rows, k), packed, None).shape == (1, rows, 192)


@pytest.mark.parametrize("scheme,shape,dtype,device,why", [
    ("w3g128", (64, 256), torch.bfloat16, "cpu", "4-bit weight-only integer schemes, not w3g128"),
    ("w8", (64, 256), torch.bfloat16, "cpu", "not w8"),
    ("nf4", (64, 256), torch.bfloat16, "cpu", "not nf4"),
    ("w4g128", (48, 256), torch.bfloat16, "cpu", "48 output rows are not a multiple of 64"),
    ("w4-tensor", (64, 256), torch.bfloat16, "cpu", "not one per tensor"),
    ("w4g128", (64, 200), torch.bfloat16, "cpu", "divides both the group 128 and K=200"),
    ("w4g128", (64, 256), torch.float32, "cpu", "bfloat16 activations, not float32"),
    ("w4g128", (64, 256), torch.bfloat16, "cuda", "runs on CPU, not cuda"),
])
def test_layers_it_cannot_run_are_refused_with_a_reason(scheme, shape, dtype, device, why):
    qt = quantize_tensor(torch.randn(*shape), scheme)
    assert why in KERNEL.supports(_spec(qt, dtype, device))


def test_act_order_is_refused():
    qt = quantize_tensor(torch.randn(64, 256), "w4g128")
    qt.g_idx = (torch.arange(256) // 128).to(torch.int32)
    assert "act-order" in KERNEL.supports(_spec(qt))


def _tiny_quantized(scheme="w4g64"):
    from transformers import LlamaConfig, LlamaForCausalLM

    import edgequant as eq

    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=192, vocab_size=160,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return eq.quantize(eq.Model(LlamaForCausalLM(config).eval(), None, {"name": "tiny"}),
                       "rtn", scheme=scheme)


def test_prepacked_model_keeps_its_outputs_holds_one_copy_and_cannot_be_saved():
    model = _tiny_quantized()
    ids = torch.randint(0, 160, (1, 12))
    want = model.module(input_ids=ids).logits
    layer = model.module.model.layers[0].mlp.down_proj
    nbytes = layer.nbytes
    plan = use_kernels(model.module.to(torch.bfloat16), torch.bfloat16, "cpu")
    assert plan.counts() == {"int4_cpu": 14}  # 7 linears × 2 blocks; lm_head stays 16-bit
    assert plan.fallbacks() == {}
    got = model.module(input_ids=ids).logits.float()
    assert (got - want).norm() / want.norm() < 3e-2
    # the kernel's layout replaced the artifact's buffers: one copy of the codes
    assert {n for n, _ in layer.named_buffers()} == {"packed_codes", "packed_scales_zeros"}
    assert layer.packed_codes.numel() == 128 * 192 // 2 and layer.nbytes == nbytes
    with pytest.raises(KernelError, match="does not keep the artifact's tensors"):
        model.module.state_dict()
    with pytest.raises(KernelError, match="does not keep"):
        use_kernels(model.module, torch.bfloat16, "cpu", policy="reference")
    # asking again for what it already runs is a no-op
    assert use_kernels(model.module, torch.bfloat16, "cpu").counts() == {"int4_cpu": 14}
