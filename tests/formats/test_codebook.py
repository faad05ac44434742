"""NF4 / FP4: bit-exact agreement with bitsandbytes on CPU, double quantization, sizes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from edgequant.errors import SchemeError
from edgequant.formats import QuantScheme, get_format, quantize_tensor
from edgequant.formats.base import group, ungroup
from edgequant.formats.codebook import FP4_CODE, NF4_CODE, dynamic_map

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def weights(kind: str, shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape
    w = torch.randn(rows, cols, generator=gen)
    if kind == "heavy":  # outliers and rows of very different scale
        w = w * torch.rand(rows, 1, generator=gen) * 5 + (torch.rand(rows, cols, generator=gen)
                                                            > 0.99) * 40.0
    elif kind == "zeros":  # all-zero blocks and rows, exact zeros inside blocks
        w[0] = 0.0
        w[:, :64] = 0.0
        w[w.abs() < 0.3] = 0.0
    elif kind == "edges":  # values on the codebook midpoints and tiny ones (the tie rules)
        w = torch.rand(rows, cols, generator=gen) * 2e-3 - 1e-3
        w[:, ::64] = 1.0  # every 64-block has absmax exactly 1: x/absmax == x
        ties = torch.cat([(c[:-1] + c[1:]) / 2 for c in (NF4_CODE, FP4_CODE.sort().values)])
        k = min(len(ties), cols - 1)
        w[:, 1:k + 1] = ties[:k]
    return w


def bnb_reference(bnb_f, w: torch.Tensor, quant_type: str, dq: bool):
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, compress_statistics=dq,
                                        quant_type=quant_type)
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(w.shape)  # high nibble first
    return codes, bnb_f.dequantize_4bit(packed, state), state


CASES = [((16, 128), "normal", 0), ((1, 320), "normal", 1), ((37, 192), "heavy", 2),
         ((9, 256), "zeros", 3), ((4, 128), "edges", 4), ((300, 128), "normal", 5)]


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "kind", "seed"), CASES)
def test_identical_to_bitsandbytes(quant_type, dq, shape, kind, seed):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    w = weights(kind, shape, seed)
    codes, deq, state = bnb_reference(bnb_f, w, quant_type, dq)
    q = quantize_tensor(w, quant_type + ("-dq" if dq else ""))
    assert torch.equal(q.unpacked_codes(), codes)
    assert torch.equal(q.dequantize(), deq)
    if dq:
        assert torch.equal(q.stored["absmax"].reshape(-1), state.absmax)
        assert torch.equal(q.stored["nested_absmax"], state.state2.absmax)
        assert torch.equal(q.stored["nested_offset"], state.offset.reshape(1))
    else:
        assert torch.equal(q.stored["absmax"].reshape(-1), state.absmax)
        assert q.stored["absmax"].dtype == torch.float32


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quant_matches_bitsandbytes_where_nearest_value_would_not(quant_type):
    """Block absmax values straddling their mean by 1e-1 … 1e-6: the 8-bit step then lands on
    tiny values, where bitsandbytes' 65536-slot lookup table and the true nearest value differ.
    """
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(7)
    n = 600  # blocks
    e = 10 ** (-1 - 5 * torch.rand(n // 2, generator=gen))
    absmax = torch.cat([1 + e, 1 - e])[torch.randperm(n, generator=gen)]
    w = (torch.rand(n, 64, generator=gen) * 2 - 1) * 0.9 * absmax[:, None]
    w[:, 0] = absmax
    w = w.reshape(20, 30 * 64)
    codes, deq, state = bnb_reference(bnb_f, w, quant_type, True)
    q = quantize_tensor(w, quant_type + "-dq")
    assert torch.equal(q.stored["absmax"].reshape(-1), state.absmax)
    assert torch.equal(q.dequantize(), deq)
    # and the case is a real one: some absmax codes are not the nearest map value
    v = q.stored["absmax"].reshape(-1).long()
    a = w.reshape(-1, 64).abs().amax(1)
    y = (a - a.mean()) / q.stored["nested_absmax"].repeat_interleave(256)[:n]
    m = dynamic_map()
    nearest = (y[:, None] - m).abs().argmin(1)
    assert (m[v] - y).abs().gt((m[nearest] - y).abs()).any()


def test_codebooks_are_bitsandbytes():
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(NF4_CODE, bnb_f.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnb_f.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb_f.create_dynamic_map())


def test_codebooks_by_hand():
    # NF4: sorted, symmetric ends, zero at code 7
    assert NF4_CODE[0] == -1 and NF4_CODE[7] == 0 and NF4_CODE[15] == 1
    assert (NF4_CODE.diff() > 0).all()
    # FP4 (bitsandbytes): sign bit 3, magnitudes 0, 1/16, 8, 12, 4, 6, 2, 3 over 12
    mags = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3]) / 12
    assert torch.equal(FP4_CODE[:8], mags) and torch.equal(FP4_CODE[8:], -mags)
    m = dynamic_map()
    assert m.numel() == 256 and (m.diff() > 0).all() and m[-1] == 1 and (m == 0).sum() == 1


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 200), seed=st.integers(0, 2**31),
       dq=st.booleans(), gran=st.sampled_from(["tensor", "channel", "group"]))
def test_each_code_is_the_nearest_codebook_value(quant_type, rows, cols, seed, dq, gran):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    scheme = QuantScheme(format=quant_type, granularity=gran, double_quant=dq,
                         group_size=64 if gran == "group" else None, scale_dtype="float32")
    fmt = get_format(quant_type)
    xg = group(w, scheme)
    p = fmt.params(xg, scheme)
    y = xg / xg.abs().amax(-1, keepdim=True).clamp(min=1e-30)  # (R, G, g)
    got = CODES[quant_type][fmt.encode(xg, p, scheme).long()]
    best = (y.unsqueeze(-1) - CODES[quant_type]).abs().amin(-1)
    assert ((y - got).abs() <= best + 1e-6).all()
    # decoding with params() of the whole tensor is what a stored tensor decodes to
    x_hat = ungroup(fmt.decode(fmt.encode(xg, p, scheme), p, scheme), (rows, cols))
    assert torch.equal(x_hat, quantize_tensor(w, scheme).dequantize())


def test_double_quant_reconstructs_absmax_closely():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(3))
    w = w * torch.linspace(0.1, 3, 64)[:, None]
    q = quantize_tensor(w, "nf4-dq")
    a = w.reshape(-1, 64).abs().amax(1)
    a_hat = q.params()["absmax_dq"].reshape(-1)
    dev = (a - a.mean()).abs()
    # 8-bit dynamic map: relative spacing near the block maximum is 0.9/64
    block_max = dev.reshape(-1, 256).amax(1).repeat_interleave(256)
    assert ((a_hat - a).abs() <= block_max * (0.9 / 64) / 2 * 1.01).all()


@pytest.mark.parametrize("text", ["nf4", "fp4-dq", "nf4-channel", "fp4-tensor", "nf4-dq-fp32"])
def test_all_zero_weights_are_exact_with_finite_stored_values(text):
    w = torch.randn(3, 192)
    w[1] = 0.0
    q = quantize_tensor(w, text)
    for t in q.stored.values():
        assert torch.isfinite(t.float()).all()
    if QuantScheme.parse(text).granularity != "tensor":
        assert torch.equal(q.dequantize()[1], w[1])
    z = quantize_tensor(torch.zeros(2, 130), text)
    assert torch.equal(z.dequantize(), torch.zeros(2, 130))


@pytest.mark.parametrize("text", ["nf4", "nf4-fp32", "fp4"])
def test_absmax_is_fp32(text):
    q = quantize_tensor(torch.randn(4, 128), text)
    assert q.stored["absmax"].dtype == torch.float32


@pytest.mark.parametrize("text", ["nf4-bf16", "fp4-fp16"])
def test_other_absmax_dtypes_are_refused(text):
    with pytest.raises(SchemeError, match="float32"):
        QuantScheme.parse(text)


def test_bits_per_weight_by_hand():
    w = torch.randn(64, 1536)
    assert quantize_tensor(w, "nf4").bits_per_weight == 4.5  # 4 + 32/64
    assert quantize_tensor(w, "fp4g128").bits_per_weight == 4.25  # 4 + 32/128
    # QLoRA: 8-bit absmax per 64, one fp32 per 256 of those, one fp32 offset
    n = w.numel()
    blocks = n // 64
    want = 4 + 8 / 64 + (32 * math.ceil(blocks / 256) + 32) / n
    q = quantize_tensor(w, "nf4-dq")
    assert q.bits_per_weight == pytest.approx(want, rel=1e-12)
    assert round(q.bits_per_weight, 3) == 4.127
    assert q.nbytes == n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4
