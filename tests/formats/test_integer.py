"""Affine integers: the half-step error bound, tight scales, edge cases and honest sizes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.errors import SchemeError, WeightError
from edgequant.formats import QuantizedTensor, QuantScheme, quantize_tensor
from edgequant.formats.base import ungroup

from . import assert_rounded_up, per_element

LAYER = "model.layers.0.mlp.up_proj"


def reference_scale(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The exact (unrounded) scale of each element, computed group by group in float64."""
    maxq = 2**scheme.bits - 1
    rows, cols = w.shape
    if scheme.granularity == "tensor":
        blocks = [(slice(None), slice(None))]
    else:
        g = cols if scheme.granularity == "channel" else scheme.group_size
        blocks = [(r, slice(k, k + g)) for r in range(rows) for k in range(0, cols, g)]
    out = torch.empty(rows, cols, dtype=torch.float64)
    for idx in blocks:
        x = w[idx].double()
        lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
        out[idx] = 2 * max(-lo, hi) / maxq if scheme.symmetric else (hi - lo) / maxq
    return out


@st.composite
def int_cases(draw):
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 150))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    scheme = QuantScheme(
        bits=draw(st.integers(2, 8)), symmetric=draw(st.booleans()), granularity=gran,
        group_size=draw(st.sampled_from([1, 3, 7, 16, 32, 64, 128])) if gran == "group" else None,
        scale_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    magnitude = 10.0 ** draw(st.floats(-2, 2))
    kind = draw(st.sampled_from(["normal", "uniform", "outlier", "positive"]))
    w = torch.randn(rows, cols, generator=gen)
    if kind == "uniform":
        w = torch.rand(rows, cols, generator=gen) * 2 - 1
    elif kind == "outlier":
        w[0, cols // 2] = 50.0
    elif kind == "positive":
        w = w.abs() + 0.5
    return w * magnitude, scheme


@settings(max_examples=60, deadline=None)
@given(int_cases())
def test_error_is_at_most_half_a_step_and_scales_are_tight(case):
    w, scheme = case
    q = quantize_tensor(w, scheme)
    w_hat = q.dequantize()
    params = q.params()
    step = per_element(params["scales"], w.shape, scheme)
    maxq = 2**scheme.bits - 1
    # |x - x_hat| <= step/2, up to float rounding of x/s and of the product
    tol = 1e-6 * (w.abs() + step * maxq)
    assert ((w - w_hat).abs() <= step / 2 + tol).all()
    # the scale is the smallest the storage dtype allows: never below the exact one
    assert_rounded_up(step, reference_scale(w, scheme), scheme.scale_dtype)
    if not scheme.symmetric:
        z = params["zeros"]
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= maxq


def test_symmetric_grid_by_hand():
    # 4-bit symmetric: s = 2 * 7.5 / 15 = 1, codes 0..15 stand for -8..7
    w = torch.tensor([[7.5, -7.5, 0.4, -2.6, 3.0, 0.0]])
    q = quantize_tensor(w, "w4-fp32")
    assert q.params()["scales"].item() == 1.0
    # 7.5 rounds to the even 8, clamped to the largest code 7; -7.5 -> -8
    assert q.dequantize().tolist() == [[7.0, -8.0, 0.0, -3.0, 3.0, 0.0]]


def test_asymmetric_grid_by_hand():
    # range [min(x,0), max(x,0)] = [0, 30] over 3 bits: s = 30/7, zero-point 0
    w = torch.tensor([[30.0, 0.0, 15.0, 4.0]])
    q = quantize_tensor(w, "w3-asym-fp32")
    p = q.params()
    assert p["scales"].item() == pytest.approx(30 / 7)
    assert p["zeros"].item() == 0
    assert q.unpacked_codes().tolist() == [[7, 0, 4, 1]]  # 15/(30/7) = 3.5 -> 4 (even)


@pytest.mark.parametrize("text", ["w4g128", "w3g7-asym", "w8-tensor", "w2-bf16", "w5g3-fp32"])
def test_all_zero_weights_give_finite_scales_and_exact_zeros(text):
    w = torch.zeros(5, 37)
    q = quantize_tensor(w, text)
    for v in q.params().values():
        assert torch.isfinite(v).all()
    assert (q.params()["scales"] > 0).all()
    assert torch.equal(q.dequantize(), w)


@pytest.mark.parametrize("text", ["w4g16", "w3g16-asym", "w8", "w2-asym-bf16"])
@pytest.mark.parametrize("value", [1e-3, -2.5, 700.0])
def test_constant_rows(text, value):
    w = torch.full((3, 40), value)
    w[1] = 0.0
    q = quantize_tensor(w, text)
    s = QuantScheme.parse(text)
    step = per_element(q.params()["scales"], w.shape, s)
    assert torch.isfinite(step).all() and (step > 0).all()
    w_hat = q.dequantize()
    assert torch.equal(w_hat[1], w[1])  # the zero row stays exactly zero
    assert ((w - w_hat).abs() <= step / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_name_the_layer(bad):
    w = torch.randn(4, 8)
    w[2, 3] = bad
    with pytest.raises(WeightError, match=LAYER.replace(".", r"\.")):
        quantize_tensor(w, "w4g4", name=LAYER)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_non_matrix_weights_name_the_layer(shape):
    with pytest.raises(WeightError, match="up_proj"):
        quantize_tensor(torch.randn(shape), "w4", name=LAYER)


def test_scales_that_overflow_the_storage_dtype_are_an_error():
    w = torch.full((2, 8), 1e6)
    with pytest.raises(SchemeError, match="fp32"):
        quantize_tensor(w, "w4")
    assert torch.isfinite(quantize_tensor(w, "w4-fp32").dequantize()).all()


# ------------------------------------------------------------------------- sizes, by hand
@pytest.mark.parametrize(("text", "shape", "bpw"), [
    ("w4g128", (64, 1536), 4.125),                       # 4 + 16/128
    ("w4g128", (64, 576), 4 + 5 * 16 / 576),             # ragged: ceil(576/128) = 5 scales a row
    ("w4g128-asym", (64, 1536), 4 + (16 + 4) / 128),     # + a 4-bit zero-point per group
    ("w3g128-asym", (64, 1536), 3 + (16 + 3) / 128),
    ("w8", (64, 1536), 8 + 16 / 1536),                   # one fp16 scale per row
    ("w8-tensor", (64, 1536), 8 + 16 / (64 * 1536)),
    ("w4g128-fp32", (64, 1536), 4 + 32 / 128),
    ("w2g64-bf16", (64, 1536), 2 + 16 / 64),
])
def test_bits_per_weight_by_hand(text, shape, bpw):
    q = quantize_tensor(torch.randn(shape), text)
    assert q.bits_per_weight == pytest.approx(bpw, rel=1e-12)


def test_nbytes_by_hand():
    q = quantize_tensor(torch.randn(64, 1536), "w4g128")
    assert q.nbytes == 64 * 1536 // 2 + 64 * 12 * 2
    q = quantize_tensor(torch.randn(3, 7), "w3g4-asym")  # 21 codes, 6 groups
    assert q.nbytes == math.ceil(21 * 3 / 8) + 6 * 2 + math.ceil(6 * 3 / 8)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(1, 150), bits=st.integers(2, 8),
       g=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_float_zero_round_trip_and_bound(rows, cols, bits, g, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3 + 0.5
    scheme = QuantScheme.parse(f"w{bits}g{g}-asym-fz")
    q = quantize_tensor(w, scheme)
    assert q.stored["zeros"].dtype == torch.float16 and q.stored["zeros"].shape == q.pshape
    s = q.params()["scales"]
    step = ungroup(s.expand(*s.shape[:2], g), (rows, cols))
    # fp16 rounding of the zero moves the grid by at most 2^-11 of the largest code
    tol = step * (0.5 + ((1 << bits) - 1) * 2.0**-11) + 1e-6
    assert ((q.dequantize() - w).abs() <= tol).all()
    r = QuantizedTensor.from_tensors(q.tensors(), scheme, (rows, cols))
    assert torch.equal(r.dequantize(), q.dequantize())
    assert q.bits_per_weight == pytest.approx(
        8 * (q.codes.numel() + 4 * q.pshape[0] * q.pshape[1]) / (rows * cols))


def test_float_zero_needs_asymmetric_integers():
    for bad in ("w4g64-fz", "nf4-fz", "fp8-fz"):
        with pytest.raises(SchemeError, match="asym"):
            QuantScheme.parse(bad)
