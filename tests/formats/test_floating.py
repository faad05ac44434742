"""float8 (bit-exact with torch's casts) and OCP FP4 e2m1 (nearest, ties to even)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.formats import QuantScheme, get_format, quantize_tensor
from edgequant.formats.base import group

from . import assert_rounded_up, per_element

F8 = {"fp8_e4m3": (torch.float8_e4m3fn, 448.0), "fp8_e5m2": (torch.float8_e5m2, 57344.0)}
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # OCP MX spec v1.0, table of e2m1 values


def group_absmax(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    rows, cols = w.shape
    if scheme.granularity == "tensor":
        return w.abs().max().expand(rows, cols)
    if scheme.granularity == "channel":
        return w.abs().amax(1, keepdim=True).expand(rows, cols)
    g = scheme.group_size
    out = torch.empty_like(w)
    for k in range(0, cols, g):
        out[:, k:k + g] = w[:, k:k + g].abs().amax(1, keepdim=True)
    return out


@st.composite
def float_cases(draw, fmt: str):
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 130))
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    scheme = QuantScheme(
        bits=8 if fmt.startswith("fp8") else 4, format=fmt, granularity=gran,
        group_size=draw(st.sampled_from([1, 5, 32, 64])) if gran == "group" else None,
        scale_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])),
    )
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    w = torch.randn(rows, cols, generator=gen) * 10.0 ** draw(st.floats(-2, 2))
    if draw(st.booleans()):
        w = w * torch.rand(rows, cols, generator=gen) ** 4  # many small values: subnormals
    return w, scheme


def check_scale(w, q, scheme, fmax):
    """Scale = group absmax / FMAX, rounded up to the storage dtype (never clipping)."""
    s = per_element(q.params()["scales"], w.shape, scheme)
    assert_rounded_up(s, group_absmax(w, scheme).double() / fmax, scheme.scale_dtype)
    return s


@pytest.mark.parametrize("fmt", sorted(F8))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fp8_codes_are_torch_float8_casts(fmt, data):
    w, scheme = data.draw(float_cases(fmt))
    dtype, fmax = F8[fmt]
    q = quantize_tensor(w, scheme)
    s = check_scale(w, q, scheme, fmax)
    expected = (w / s).to(dtype)
    assert torch.equal(q.unpacked_codes(), expected.view(torch.uint8))
    assert torch.equal(q.dequantize(), expected.to(torch.float32) * s)


@pytest.mark.parametrize(("fmt", "values", "codes"), [
    # e4m3fn: s eeee mmm, bias 7; 448 = 1.75 * 2^8; 2^-9 is the smallest subnormal;
    # 1.0625 lies halfway between 1 and 1.125 and goes to the even mantissa (1.0)
    ("fp8_e4m3", [448.0, 1.0, -2.0, 0.5, 3.0, 2.0**-9, 0.0, 1.0625, -448.0],
     [0x7E, 0x38, 0xC0, 0x30, 0x44, 0x01, 0x00, 0x38, 0xFE]),
    # e5m2: s eeeee mm, bias 15; 57344 = 1.75 * 2^15; 2^-16 is the smallest subnormal
    ("fp8_e5m2", [57344.0, 1.0, -0.5, 2.0**-16, 0.0, 1.125],
     [0x7B, 0x3C, 0xB8, 0x01, 0x00, 0x3C]),
])
def test_fp8_bit_patterns_by_hand(fmt, values, codes):
    # the row's absmax is FMAX itself, so the scale is exactly 1
    q = quantize_tensor(torch.tensor([values]), f"{'fp8' if fmt == 'fp8_e4m3' else fmt}-fp32")
    assert q.params()["scales"].item() == 1.0
    assert q.unpacked_codes().tolist() == [codes]


@pytest.mark.parametrize("fmt", sorted(F8))
def test_fp8_decode_is_the_exact_inverse_on_representable_values(fmt):
    dtype, fmax = F8[fmt]
    every = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    every = every[torch.isfinite(every) & (every.abs() <= fmax)]
    w = every.reshape(1, -1)
    q = quantize_tensor(w, QuantScheme(bits=8, format=fmt, granularity="channel",
                                       group_size=None, scale_dtype="float32"))
    assert q.params()["scales"].item() == 1.0
    assert torch.equal(q.dequantize(), w)


# ----------------------------------------------------------------------------------- FP4
def test_e2m1_rounding_by_hand():
    # absmax 6 -> scale exactly 1; ties go to the even code (even mantissa)
    vals = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, 6.0, -6.0, 0.0, 0.3, 2.9, -4.4, 0.26]
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, 6.0, -6.0, 0.0, 0.5, 3.0, -4.0, 0.5]
    codes = [0, 2, 2, 4, 4, 6, 6, 8, 7, 15, 0, 1, 5, 14, 1]
    q = quantize_tensor(torch.tensor([vals]), "fp4_e2m1-fp32")
    assert q.params()["scales"].item() == 1.0
    assert q.unpacked_codes().tolist() == [codes]
    assert q.dequantize().tolist() == [want]


def test_e2m1_code_table_is_sign_exponent_mantissa():
    fmt = get_format("fp4_e2m1")
    s = QuantScheme.parse("fp4_e2m1")
    one = {"scales": torch.ones(1, 1, 1)}
    got = fmt.decode(torch.arange(16, dtype=torch.uint8).view(1, 1, 16), one, s).flatten()
    for c in range(16):
        sign, e, m = c >> 3, (c >> 1) & 3, c & 1
        value = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)  # bias 1, subnormal e=0
        assert got[c].item() == (-value if sign else value)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_e2m1_picks_the_nearest_value(data):
    w, scheme = data.draw(float_cases("fp4_e2m1"))
    q = quantize_tensor(w, scheme)
    s = check_scale(w, q, scheme, 6.0)
    y = w / s
    got = q.dequantize() / s
    grid = torch.tensor(E2M1)
    nearest = (y.abs().unsqueeze(-1) - grid).abs().min(-1).values
    assert ((y.abs() - got.abs()).abs() <= nearest + 1e-6).all()
    assert ((got == 0) | (torch.sign(got) == torch.sign(y))).all()


def _torchao_e2m1_reference():
    """torchao's FP32 -> e2m1 converter, vendored by torch as ``_vendor/quack/mx_utils.py``.

    Loaded from its file: the ``quack`` package itself needs CUDA bindings.
    """
    path = Path(torch.__file__).parent / "_vendor" / "quack" / "mx_utils.py"
    if not path.exists():
        pytest.skip("this torch does not vendor torchao's mx_utils")
    spec = importlib.util.spec_from_file_location("_edgequant_test_mx_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._f32_to_floatx_unpacked


def test_e2m1_codes_match_torchaos_converter():
    reference = _torchao_e2m1_reference()
    # every midpoint, its float neighbours, zeros of both signs, and a dense sweep
    mids = torch.tensor([(a + b) / 2 for a, b in zip(E2M1, E2M1[1:], strict=False)])
    edges = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    sweep = torch.linspace(0, 6, 6001)
    mags = torch.cat([edges, sweep, torch.tensor(E2M1), torch.tensor([1e-30, 0.0])])
    y = torch.cat([mags, -mags, torch.tensor([6.0])]).reshape(1, -1)  # absmax 6 -> scale 1
    q = quantize_tensor(y, QuantScheme(bits=4, format="fp4_e2m1", granularity="channel",
                                       group_size=None, scale_dtype="float32"))
    assert q.params()["scales"].item() == 1.0
    assert torch.equal(q.unpacked_codes(), reference(y, 2, 1))


@pytest.mark.parametrize("text", ["fp8", "fp8_e5m2g16", "fp4_e2m1", "fp8-tensor-bf16"])
def test_all_zero_groups_give_exact_zeros(text):
    w = torch.randn(3, 48)
    w[1] = 0.0
    q = quantize_tensor(w, text)
    assert torch.isfinite(q.params()["scales"]).all()
    assert (q.params()["scales"] > 0).all()
    if QuantScheme.parse(text).granularity != "tensor":
        assert torch.equal(q.dequantize()[1], w[1])
    assert torch.equal(quantize_tensor(torch.zeros(2, 7), text).dequantize(), torch.zeros(2, 7))


def test_grouped_encode_decode_is_the_inverse_for_e2m1_values():
    scheme = QuantScheme.parse("fp4_e2m1-fp32")
    fmt = get_format("fp4_e2m1")
    w = torch.tensor([E2M1 + [-v for v in E2M1]]) * 0.75  # 8 + 8 = 16 values, absmax 4.5
    xg = group(w, scheme)
    p = fmt.params(xg, scheme)
    assert torch.equal(fmt.decode(fmt.encode(xg, p, scheme), p, scheme), xg)
