"""HQQ: lower weight error than RTN at every width, valid int tensors, masked ragged groups."""

from __future__ import annotations

import pytest
import torch

import edgequant as eq
from edgequant.errors import SchemeError
from edgequant.formats import QuantizedTensor, QuantScheme, quantize_tensor
from edgequant.methods import get_quantizer
from edgequant.methods.hqq import (
    HQQConfig,
    dequantize_float_zero,
    hqq_params,
    hqq_quantize,
    shrink_lp,
)
from edgequant.methods.registry import make_config


def weights(kind: str, shape: tuple[int, int] = (96, 512), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss":
        return 0.02 * torch.randn(shape, generator=g)
    # Student-t, 3 degrees of freedom (heavy tails like real LLM weights): z / sqrt(chi2_3 / 3)
    z = torch.randn(shape, generator=g)
    chi2 = torch.randn(3, *shape, generator=g).pow(2).sum(0)
    return 0.02 * z / (chi2 / 3).sqrt()


def errors(W: torch.Tensor, W_hat: torch.Tensor) -> tuple[float, float]:
    d = W - W_hat
    return float(d.abs().mean()), float(d.pow(2).mean().sqrt())


SCHEMES = ["w2g64-asym", "w3g128-asym", "w4g64-asym", "w4g128-asym", "w8g128-asym",
           "w4-asym", "w3g128", "w4g128"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("kind", ["gauss", "student-t"])
def test_weight_error_below_rtn(scheme: str, kind: str) -> None:
    W = weights(kind)
    qt = hqq_quantize(W, scheme)
    l1, l2 = errors(W, qt.dequantize())
    r1, r2 = errors(W, quantize_tensor(W, scheme).dequantize())
    assert l1 < 0.99 * r1 and l2 < 0.995 * r2


@pytest.mark.parametrize("scheme", ["w3g128-asym", "w4g64-asym"])
def test_reference_zero_only_float_zeros_beat_rtn(scheme: str) -> None:
    """The reference algorithm (zero-point only, float zeros) lowers mean |W − Ŵ|."""
    W = weights("student-t", seed=1)
    cfg = HQQConfig(optimize_scale=False)
    l1, _ = errors(W, dequantize_float_zero(W, scheme, cfg))
    r1, _ = errors(W, quantize_tensor(W, scheme).dequantize())
    assert l1 < 0.99 * r1
    _, params, _ = hqq_params(W, scheme, cfg)
    assert not torch.equal(params["zeros"], params["zeros"].round())  # really float


@pytest.mark.parametrize("scheme", ["w4g128-asym", "w3g128", "w2-asym", "w4-tensor"])
def test_is_a_valid_int_tensor_with_honest_size(scheme: str) -> None:
    W = weights("gauss", seed=2)
    qt = hqq_quantize(W, scheme)
    rtn = quantize_tensor(W, scheme)
    assert qt.bits_per_weight == rtn.bits_per_weight
    s = QuantScheme.parse(scheme)
    again = QuantizedTensor.from_tensors(qt.tensors(), s, qt.shape)
    assert torch.equal(again.dequantize(), qt.dequantize())
    if not s.symmetric:
        z = qt.params()["zeros"]
        assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= 2**s.bits - 1


def test_ragged_group_ignores_padding() -> None:
    """Without the global early stop groups are independent: the last 64 of 576 columns
    under g128 must come out exactly as those columns alone under g64."""
    W = weights("student-t", shape=(16, 576), seed=3)
    cfg = HQQConfig(early_stop=False)
    full = hqq_quantize(W, "w3g128-asym", cfg).dequantize()
    tail = hqq_quantize(W[:, 512:].contiguous(), "w3g64-asym", cfg).dequantize()
    torch.testing.assert_close(full[:, 512:], tail, rtol=0, atol=0)


def test_constant_and_zero_groups_are_exact() -> None:
    W = weights("gauss", shape=(4, 256), seed=4)
    W[0] = 0.0
    W[1, :128] = 0.25
    W_hat = hqq_quantize(W, "w4g128-asym").dequantize()
    assert torch.all(W_hat[0] == 0)
    assert torch.isfinite(W_hat).all()
    assert float((W_hat[1, :128] - 0.25).abs().max()) < 0.25 / 15


def test_shrink_operator() -> None:
    x = torch.tensor([-3.0, -0.05, 0.0, 0.05, 3.0])
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=1.0),
                               torch.tensor([-2.9, 0.0, 0.0, 0.0, 2.9]))
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert torch.isfinite(y).all() and y[2] == 0
    assert torch.all(y.abs() <= x.abs()) and torch.all(y * x >= 0)  # shrinks, keeps sign
    assert y[1] == 0 and y[3] == 0  # small values are zeroed (sparse error)


def test_bad_options() -> None:
    with pytest.raises(SchemeError, match="integer"):
        hqq_quantize(weights("gauss"), "nf4")
    for bad in ({"lp_norm": 0.0}, {"kappa": 1.0}, {"iters": 0}, {"beta": -1.0}):
        with pytest.raises(SchemeError):
            HQQConfig(**bad)  # type: ignore[arg-type]


def test_registered_method_needs_no_calibration() -> None:
    m = get_quantizer("hqq")
    assert not m.needs and not eq.Recipe.parse("hqq").needs_calibration
    W = weights("gauss", shape=(8, 128))
    qt = m.quantize_weight(W, QuantScheme.parse("w4g64-asym"), {}, make_config(m, {}))
    assert qt.shape == (8, 128)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_float_zero_storage_beats_integer_zero(bits):
    """HQQ's own storage (float zero-points, ``-fz``) reconstructs better than integer zeros
    and round-trips through the stored tensors."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    fz = hqq_quantize(w, f"w{bits}g64-asym-fz")
    iz = hqq_quantize(w, f"w{bits}g64-asym")
    err = lambda q: (q.dequantize() - w).abs().mean().item()  # noqa: E731
    assert err(fz) < err(iz)
    back = QuantizedTensor.from_tensors(fz.tensors(), fz.scheme, fz.shape)
    assert torch.equal(back.dequantize(), fz.dequantize())
