"""Binary (sign · mean|w|) and ternary (TWN) weights."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.formats import QuantScheme, get_format, quantize_tensor
from edgequant.formats.base import group


def test_binary_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [0.0, 0.0, 0.0, 0.0],
                      [-0.5, 0.5, 0.0, 1.5]])
    q = quantize_tensor(w, "binary")
    # alpha = mean|w| per row: 2.5, 0, 0.625; zero counts as positive
    assert q.params()["scales"].flatten().tolist() == [2.5, 0.0, 0.625]
    assert q.unpacked_codes().tolist() == [[1, 0, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]]
    assert q.dequantize().tolist() == [[2.5, -2.5, 2.5, -2.5],
                                       [0.0, 0.0, 0.0, 0.0],
                                       [-0.625, 0.625, 0.625, 0.625]]


def test_ternary_by_hand():
    w = torch.tensor([[3.0, -3.0, 0.5, -0.2, 2.0, 0.0, 1.0, -1.0],
                      [0.0] * 8])
    q = quantize_tensor(w, "ternary")
    # row 0: mean|w| = 10.7/8, delta = 0.7 * 1.3375 = 0.93625; above it: 3, 3, 2, 1, 1 -> alpha 2
    # row 1: all zero -> alpha 1, every code 0
    assert q.params()["scales"].flatten().tolist() == [2.0, 1.0]
    assert q.unpacked_codes().tolist() == [[1, 3, 0, 0, 1, 0, 1, 3], [0] * 8]
    assert q.dequantize().tolist() == [[2.0, -2.0, 0.0, 0.0, 2.0, 0.0, 2.0, -2.0], [0.0] * 8]


def test_ternary_code_table():
    fmt, s = get_format("ternary"), QuantScheme.parse("ternary")
    got = fmt.decode(torch.arange(4, dtype=torch.uint8).view(1, 1, 4),
                     {"scales": torch.full((1, 1, 1), 3.0)}, s)
    assert got.flatten().tolist() == [0.0, 3.0, 0.0, -3.0]


@st.composite
def sign_cases(draw):
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 130))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    g = draw(st.sampled_from([4, 16, 64])) if gran == "group" else None
    if g is not None:
        cols = max(1, cols // g) * g  # whole groups: the mean covers real columns only
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    w = torch.randn(rows, cols, generator=gen) * 10.0 ** draw(st.floats(-2, 2))
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    return w, gran, g, dtype


def blocks_of(w: torch.Tensor, gran: str, g: int | None) -> torch.Tensor:
    """(blocks, block_len) rows of w in the order of the grouped view."""
    if gran == "tensor":
        return w.reshape(1, -1)
    if gran == "channel":
        return w
    return w.reshape(-1, g)


TOL = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-22}


@settings(max_examples=40, deadline=None)
@given(sign_cases())
def test_binary_is_sign_times_mean_abs(case):
    w, gran, g, dtype = case
    q = quantize_tensor(w, QuantScheme(format="binary", bits=1, granularity=gran,
                                       group_size=g, scale_dtype=dtype))
    b = blocks_of(w, gran, g)
    alpha = b.abs().double().mean(1, keepdim=True)
    got = blocks_of(q.dequantize(), gran, g).double()
    assert torch.allclose(got.abs(), alpha.expand_as(got), rtol=TOL[dtype], atol=0)
    assert ((got > 0) == (b >= 0)).all()


@settings(max_examples=40, deadline=None)
@given(sign_cases())
def test_ternary_is_twn(case):
    w, gran, g, dtype = case
    scheme = QuantScheme(format="ternary", bits=2, granularity=gran, group_size=g,
                         scale_dtype=dtype)
    q = quantize_tensor(w, scheme)
    b = blocks_of(w, gran, g).double()
    delta = 0.7 * b.abs().mean(1, keepdim=True)
    # skip values within float noise of the threshold
    clear = ((b.abs() - delta).abs() > 1e-5 * delta)
    big = b.abs() > delta
    got = blocks_of(q.dequantize(), gran, g).double()
    assert ((got != 0) == big)[clear].all()
    assert (torch.sign(got) == torch.sign(b))[big & clear].all()
    alpha = (b.abs() * big).sum(1, keepdim=True) / big.sum(1, keepdim=True)
    nz = got != 0
    assert torch.allclose(got.abs()[nz], alpha.expand_as(got)[nz], rtol=TOL[dtype] + 1e-5)


def test_ternary_encode_without_delta_rounds_to_nearest():
    fmt, s = get_format("ternary"), QuantScheme.parse("ternary-fp32")
    x = torch.tensor([[[0.9, 1.1, -1.1, -0.9, 3.0]]])
    codes = fmt.encode(x, {"scales": torch.full((1, 1, 1), 2.0)}, s)  # threshold alpha/2 = 1
    assert codes.flatten().tolist() == [0, 1, 3, 0, 1]


@pytest.mark.parametrize("text", ["binary", "ternary", "binaryg16", "ternary-tensor",
                                  "ternaryg64-bf16"])
def test_all_zero_groups_give_exact_zeros_and_finite_scales(text):
    w = torch.randn(4, 64)
    w[2] = 0.0
    q = quantize_tensor(w, text)
    assert torch.isfinite(q.params()["scales"]).all()
    if QuantScheme.parse(text).granularity != "tensor":
        assert torch.equal(q.dequantize()[2], w[2])
    assert torch.equal(quantize_tensor(torch.zeros(3, 33), text).dequantize(), torch.zeros(3, 33))


def test_delta_is_not_stored():
    s = QuantScheme.parse("ternary")
    fmt = get_format("ternary")
    p = fmt.params(group(torch.randn(4, 32), s), s)
    assert set(p) == {"scales", "delta"}
    assert set(quantize_tensor(torch.randn(4, 32), s).stored) == {"scales"}


@pytest.mark.parametrize(("text", "bpw"), [("binary", 1 + 16 / 1536), ("ternary", 2 + 16 / 1536),
                                           ("binaryg128", 1 + 16 / 128),
                                           ("ternaryg64-fp32", 2 + 32 / 64)])
def test_bits_per_weight_by_hand(text, bpw):
    assert quantize_tensor(torch.randn(64, 1536), text).bits_per_weight == pytest.approx(bpw)
