"""QuantizedTensor: layouts for every registered format, validated reloads, act-order."""

from __future__ import annotations

import itertools

import pytest
import torch

from edgequant.errors import ArtifactError, SchemeError
from edgequant.formats import QuantizedTensor, QuantScheme, get_format, quantize_tensor
from edgequant.formats.base import group, ungroup
from edgequant.formats.scheme import FORMATS
from edgequant.formats.tensor import CODES, G_IDX


def all_schemes() -> list[QuantScheme]:
    """Every declared format x granularity x its options (asym, dq, scale dtypes)."""
    out = []
    for fmt, (bits, _, _) in FORMATS.items():
        for gran, group_size in [("tensor", None), ("channel", None), ("group", 16), ("group", 24)]:
            for sym, dq, dtype in itertools.product(
                    [True, False], [False, True], ["float16", "bfloat16", "float32"]):
                try:
                    out.append(QuantScheme(bits=bits or 4, format=fmt, symmetric=sym,
                                           granularity=gran, group_size=group_size,
                                           double_quant=dq, scale_dtype=dtype))
                except SchemeError:
                    continue
    return out


SCHEMES = all_schemes()
SHAPE = (5, 40)  # 40 columns: groups of 16 and of 24 both leave a ragged last group


def weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_every_declared_format_is_registered():
    for name in FORMATS:
        assert get_format(name).name == name
    with pytest.raises(SchemeError, match="registered"):
        get_format("int3_k")


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_layout_predicts_what_is_stored_and_reload_round_trips(scheme):
    q = quantize_tensor(weight(), scheme)
    stored = q.tensors()
    predicted = QuantizedTensor.layout(SHAPE, scheme)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == \
        {k: (tuple(s), d) for k, (s, d) in predicted.items()}
    assert q.nbytes == sum(t.numel() * t.element_size() for t in stored.values())
    assert q.bits_per_weight == 8 * q.nbytes / (SHAPE[0] * SHAPE[1])
    again = QuantizedTensor.from_tensors({k: v.clone() for k, v in stored.items()}, scheme,
                                         SHAPE, where="layer")
    assert torch.equal(again.dequantize(), q.dequantize())
    assert again.dequantize(torch.float16).dtype == torch.float16
    w_hat = q.dequantize()
    assert w_hat.shape == SHAPE and torch.isfinite(w_hat).all()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_all_zero_weights_come_back_exactly(scheme):
    q = quantize_tensor(torch.zeros(SHAPE), scheme)
    for t in q.tensors().values():
        assert torch.isfinite(t.float()).all()
    assert torch.equal(q.dequantize(), torch.zeros(SHAPE))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.scale_dtype == "float16"
                                    and s.granularity != "tensor"], ids=lambda s: s.name)
def test_column_by_column_use_matches_whole_groups(scheme):
    """GPTQ encodes one column at a time with its group's parameters, shape (R, 1, 1)."""
    fmt = get_format(scheme.format)
    w = weight(1)
    xg = group(w, scheme)
    p = fmt.params(xg, scheme)
    whole = fmt.decode(fmt.encode(xg, p, scheme), p, scheme)
    g = xg.shape[2]
    cols = []
    for c in range(w.shape[1]):
        pc = {k: v[:, c // g:c // g + 1] for k, v in p.items()}  # (R, 1, 1)
        xc = w[:, c].reshape(-1, 1, 1)
        cols.append(fmt.decode(fmt.encode(xc, pc, scheme), pc, scheme).reshape(-1))
    assert torch.equal(torch.stack(cols, 1), ungroup(whole, SHAPE))


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if s.granularity == "group"
                                    and s.scale_dtype == "float16"], ids=lambda s: s.name)
def test_act_order_g_idx_gathers_each_columns_group(scheme):
    fmt = get_format(scheme.format)
    w = weight(2)
    xg = group(w, scheme)
    p = fmt.params(xg, scheme)
    codes = ungroup(fmt.encode(xg, p, scheme), SHAPE)  # (R, C), column order
    g_idx = torch.arange(SHAPE[1]) // scheme.group_size
    q = QuantizedTensor.from_codes(codes, p, scheme, SHAPE, g_idx=g_idx)
    assert torch.equal(q.dequantize(), quantize_tensor(w, scheme).dequantize())
    assert G_IDX in QuantizedTensor.layout(SHAPE, scheme, act_order=True)
    again = QuantizedTensor.from_tensors(q.tensors(), scheme, SHAPE)
    assert torch.equal(again.g_idx, g_idx.to(torch.int32))
    # a permuted g_idx really is followed: swap two columns' groups
    perm = g_idx.clone()
    perm[0], perm[-1] = perm[-1].item(), perm[0].item()
    q2 = QuantizedTensor.from_codes(codes, p, scheme, SHAPE, g_idx=perm)
    params = q2.params()
    col0 = fmt.decode(codes[:, :1].unsqueeze(-1),
                      {k: v[:, perm[0]:perm[0] + 1] for k, v in params.items()}, scheme)
    assert torch.equal(q2.dequantize()[:, 0], col0.reshape(-1))


# ------------------------------------------------------------------ validation on load
def stored(text: str = "w4g16-asym") -> tuple[dict[str, torch.Tensor], QuantScheme]:
    s = QuantScheme.parse(text)
    return dict(quantize_tensor(weight(), s).tensors()), s


@pytest.mark.parametrize("text", ["w4g16-asym", "nf4-dq", "fp8", "ternary"])
def test_missing_or_extra_tensors_are_rejected(text):
    t, s = stored(text)
    for name in list(t):
        broken = {k: v for k, v in t.items() if k != name}
        with pytest.raises(ArtifactError, match=f"model.layers.3.q_proj.*{name}"):
            QuantizedTensor.from_tensors(broken, s, SHAPE, where="model.layers.3.q_proj")
    with pytest.raises(ArtifactError, match="bias_correction"):
        QuantizedTensor.from_tensors({**t, "bias_correction": torch.zeros(3)}, s, SHAPE)


@pytest.mark.parametrize("text", ["w4g16-asym", "nf4-dq", "fp8", "ternary", "fp4_e2m1"])
def test_wrong_dtype_or_shape_is_rejected_naming_the_tensor(text):
    t, s = stored(text)
    for name, v in t.items():
        other = torch.float32 if v.dtype != torch.float32 else torch.float16
        with pytest.raises(ArtifactError, match=f"q_proj\\.{name}: expected"):
            QuantizedTensor.from_tensors({**t, name: v.to(other)}, s, SHAPE, where="q_proj")
        with pytest.raises(ArtifactError, match=f"q_proj\\.{name}: expected shape"):
            QuantizedTensor.from_tensors({**t, name: v.reshape(-1)[:-1]}, s, SHAPE,
                                         where="q_proj")


def test_tensors_of_another_shape_or_scheme_are_rejected():
    t, s = stored("w4g16")
    with pytest.raises(ArtifactError):
        QuantizedTensor.from_tensors(t, s, (SHAPE[0] + 1, SHAPE[1]))
    with pytest.raises(ArtifactError):
        QuantizedTensor.from_tensors(t, QuantScheme.parse("w4g16-asym"), SHAPE)
    with pytest.raises(ArtifactError):
        QuantizedTensor.from_tensors(t, QuantScheme.parse("w3g16"), SHAPE)


def test_layout_by_hand():
    assert QuantizedTensor.layout((64, 1536), QuantScheme.parse("w4g128")) == {
        CODES: ((64 * 1536 // 2,), torch.uint8), "scales": ((64, 12), torch.float16)}
    assert QuantizedTensor.layout((64, 576), QuantScheme.parse("w3g128-asym")) == {
        CODES: ((64 * 576 * 3 // 8,), torch.uint8), "scales": ((64, 5), torch.float16),
        "zeros": ((64 * 5 * 3 // 8,), torch.uint8)}
    assert QuantizedTensor.layout((64, 1536), QuantScheme.parse("nf4-dq")) == {
        CODES: ((64 * 1536 // 2,), torch.uint8), "absmax": ((64, 24), torch.uint8),
        "nested_absmax": ((6,), torch.float32), "nested_offset": ((1,), torch.float32)}
    assert QuantizedTensor.layout((7, 9), QuantScheme.parse("binary-bf16")) == {
        CODES: ((8,), torch.uint8), "scales": ((7, 1), torch.bfloat16)}


def test_activation_schemes_need_integer_weights():
    with pytest.raises(SchemeError, match="integer"):
        quantize_tensor(weight(), QuantScheme(format="nf4", bits=4, group_size=64, act_bits=8,
                                              scale_dtype="float32"))
    q = quantize_tensor(weight(), "w8a8")
    assert q.scheme.act_bits == 8
