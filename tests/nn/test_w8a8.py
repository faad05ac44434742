"""W8A8Linear: integer matmul that equals its float reference, and survives save/load."""

import copy

import pytest
import torch
import torch.nn.functional as F

from edgequant.errors import DataError, SchemeError
from edgequant.formats import QuantScheme, quantize_tensor
from edgequant.kernels import use_kernels
from edgequant.nn.modules import module_class
from edgequant.nn.quant_linear import QuantLinear
from edgequant.nn.w8a8 import (
    W8A8Linear,
    int8_matmul,
    quantize_per_token,
    quantize_with_scale,
    static_act_scale,
)


def _int8(*shape, gen):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (3, 7, 5), (17, 96, 40), (64, 1536, 72)])
def test_int_mm_equals_exact_integer_product(m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    a, b = _int8(m, k, gen=gen), _int8(n, k, gen=gen)
    a[0] = -128  # extremes: the largest products
    b[0] = -128
    exact = (a.long() @ b.long().T).to(torch.int32)
    fast = int8_matmul(a, b, use_int_mm=True)
    slow = int8_matmul(a, b, use_int_mm=False)
    assert fast.dtype == slow.dtype == torch.int32
    assert torch.equal(fast, exact) and torch.equal(slow, exact)


def test_per_token_quantization():
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    x[2] = 0
    q, s = quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    assert q.abs().amax(1).tolist() == [127, 127, 0, 127, 127, 127]
    assert (q.float() * s - x).abs().max() <= s.max() / 2 + 1e-7
    q = quantize_with_scale(torch.tensor([[1.0, -5.0, 500.0]]), torch.tensor([0.1]))
    assert q.tolist() == [[10, -50, 127]]  # static ranges clamp what they never saw


def _layer(scheme, bias=True, seed=0, act_scale=None):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(40, 96, generator=gen)
    b = torch.randn(40, generator=gen) if bias else None
    qt = quantize_tensor(w, scheme)
    if not QuantScheme.parse(scheme).act_dynamic:
        act_scale = torch.tensor([3.0 / 127]) if act_scale is None else act_scale
    return W8A8Linear(qt, b, act_scale), w, b


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static", "w4a8", "w8a8-tensor"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_float_reference(scheme, bias):
    layer, w, b = _layer(scheme, bias)
    x = torch.randn(2, 9, 96, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    assert y.shape == (2, 9, 40)
    torch.testing.assert_close(y, layer.forward_reference(x), rtol=1e-5, atol=1e-5)
    fast = copy.deepcopy(layer)
    plan = use_kernels(fast, torch.float32, "cpu", policy="w8a8_int_mm")
    assert plan.counts() == {"w8a8_int_mm": 1} and layer.kernel.name == "reference"
    assert torch.equal(fast(x), y)  # torch._int_mm: the same int32 accumulator
    # and it approximates the float layer
    rel = (y - F.linear(x, w, b)).norm() / F.linear(x, w, b).norm()
    assert rel < {"w4a8": 0.2}.get(scheme, 0.03)


def test_is_a_quant_linear_with_int8_weights():
    layer, w, _ = _layer("w8a8")
    assert isinstance(layer, QuantLinear)
    wi = layer.int_weight()
    assert wi.dtype == torch.int8 and wi.shape == (40, 96)
    torch.testing.assert_close(wi.float() * layer.weight_scales().T, layer.dequantized_weight())
    assert "act_scale" not in layer.state_dict()


def test_input_dtype_is_kept():
    layer, _, _ = _layer("w8a8")
    assert layer(torch.randn(4, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-static"])
def test_state_dict_round_trip_through_skeleton(scheme):
    layer, _, _ = _layer(scheme, act_scale=torch.tensor([0.021]))
    record = {"scheme": layer.scheme.to_dict(), "shape": [40, 96], "bias": True,
              **layer.record_extra()}
    fresh = module_class("w8a8_linear").skeleton(record, where="x")
    fresh.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), layer(x))


def test_static_scale_from_min_max_observer():
    absmax = torch.tensor([0.5, 3.0, 1.0])
    assert torch.equal(static_act_scale(absmax), torch.tensor([3.0 / 127]))
    qt = quantize_tensor(torch.randn(8, 3), "w8a8-static")
    layer = W8A8Linear.from_quantized(qt, None, {"act_absmax": absmax})
    assert torch.equal(layer.act_scale.data, torch.tensor([3.0 / 127]))
    with pytest.raises(DataError, match="calibrat"):
        W8A8Linear.from_quantized(qt, None, {})


@pytest.mark.parametrize("scheme", ["w4g32", "w8", "w8a8-asym", "w8g32a8"])
def test_unsuitable_schemes_are_refused(scheme):
    with pytest.raises(SchemeError):
        W8A8Linear(quantize_tensor(torch.randn(8, 64), scheme))
