import pytest
import torch
import torch.nn.functional as F

from edgequant.formats import QuantizedTensor, quantize_tensor
from edgequant.nn.quant_linear import QuantLinear


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


def test_cached_weights_give_identical_outputs_and_are_dropped_on_exit(monkeypatch):
    from edgequant.nn.quant_linear import dequantized_weights_cached

    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantLinear(quantize_tensor(torch.randn(32, 64), "w4g32")),
                                QuantLinear(quantize_tensor(torch.randn(16, 32), "w3g32-asym")))
    x = torch.randn(5, 64)
    want = model(x)
    calls = []
    original = QuantizedTensor.dequantize
    monkeypatch.setattr(QuantizedTensor, "dequantize",
                        lambda self, dtype=torch.float32: calls.append(dtype) or
                        original(self, dtype))
    with dequantized_weights_cached(model):
        outs = [model(x) for _ in range(3)]
        model(x.bfloat16())
    assert all(torch.equal(o, want) for o in outs)
    assert calls == [torch.float32] * 2 + [torch.bfloat16] * 2  # once per layer and dtype
    assert all(m._cache is None for m in model)
    model(x)
    assert len(calls) == 6  # outside: dequantized on every forward again


@pytest.mark.parametrize("assign", [False, True])
def test_forward_follows_tensors_replaced_after_a_call(assign):
    """The layer keeps its kernel's view of its tensors between calls; loading others (in
    place, or by assignment as artifacts load) or casting must not leave it stale."""
    torch.manual_seed(0)
    a = QuantLinear(quantize_tensor(torch.randn(16, 64), "w4g32"), torch.randn(16))
    b = QuantLinear(quantize_tensor(torch.randn(16, 64), "w4g32"), torch.randn(16))
    x = torch.randn(3, 64)
    a(x)
    a.load_state_dict(b.state_dict(), assign=assign)
    assert torch.equal(a(x), b(x))
    a.half()  # scales and bias become float16 buffers: a new view
    assert a.scales.dtype == torch.float16 and a(x.half()).dtype == torch.float16
    b.qweight = torch.zeros_like(b.qweight)
    assert torch.equal(b(x), F.linear(x, b.quantized().dequantize(), b.bias))
