"""Observers: known answers on synthetic distributions, per-tensor and per-channel."""

from __future__ import annotations

import math

import pytest
import torch

from edgequant.errors import SchemeError
from edgequant.observers import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
    SampleStore,
    fake_quantize,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal_quantile(p: float) -> float:
    """Φ⁻¹(p) by bisection on erf (independent of the code under test)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def student_t(n: int, df: int, seed: int) -> torch.Tensor:
    g = gen(seed)
    z = torch.randn(n, generator=g)
    chi2 = torch.randn(df, n, generator=g).pow(2).sum(0)
    return z / (chi2 / df).sqrt()


X_NORMAL = torch.randn(400_000, generator=gen(0))


def feed(obs: Observer, x: torch.Tensor, batches: int = 8) -> Observer:
    for chunk in x.chunk(batches):
        obs.observe(chunk)
    return obs


# ------------------------------------------------------------------------------ min-max
def test_minmax_per_tensor_and_per_channel() -> None:
    x = torch.randn(10, 7, 5, generator=gen(1)) * torch.arange(1, 6)
    lo, hi = feed(MinMaxObserver(), x, 3).range()
    assert lo.shape == () and lo == x.min() and hi == x.max()
    lo, hi = feed(MinMaxObserver(axis=-1), x, 3).range()
    assert torch.equal(lo, x.amin((0, 1))) and torch.equal(hi, x.amax((0, 1)))
    lo, hi = feed(MinMaxObserver(axis=1), x, 2).range()  # chunks along axis 0
    assert torch.equal(hi, x.amax((0, 2)))


def test_moving_average_converges_and_damps_outliers() -> None:
    obs = MovingAverageMinMaxObserver(averaging_constant=0.05)
    g = gen(2)
    for i in range(400):
        shift = 0.0 if i < 100 else 5.0  # the distribution moves; the average must follow
        obs.observe(torch.randn(2000, generator=g) + shift)
    lo, hi = obs.range()
    # E[max of 2000 N(0,1)] ≈ 3.4; after 300 batches at c = 0.05 the old level is forgotten
    assert abs(float(hi) - (5 + 3.4)) < 0.2 and abs(float(lo) - (5 - 3.4)) < 0.2
    obs.observe(torch.tensor([1000.0]))  # one outlier batch moves it by c of the way
    assert float(obs.range()[1]) < 5 + 3.4 + 0.05 * 1000 + 0.3


# --------------------------------------------------------------------------- percentile
@pytest.mark.parametrize("make", [
    lambda: PercentileObserver(percentile=99.9, symmetric=False),
    lambda: HistogramObserver(method="percentile", percentile=99.9, symmetric=False),
])
def test_two_sided_percentile_of_a_normal(make) -> None:
    lo, hi = feed(make(), X_NORMAL).range()
    z = normal_quantile(0.999)  # 3.0902
    assert abs(float(hi) - z) < 0.05 and abs(float(lo) + z) < 0.05


@pytest.mark.parametrize("make", [
    lambda: PercentileObserver(percentile=99.9),
    lambda: HistogramObserver(method="percentile", percentile=99.9),
])
def test_symmetric_percentile_of_abs_normal(make) -> None:
    lo, hi = feed(make(), X_NORMAL).range()
    z = normal_quantile(1 - 0.001 / 2)  # |x| ≤ 3.2905 with probability 0.999
    assert abs(float(hi) - z) < 0.05 and float(lo) == -float(hi)


def test_percentile_per_channel_of_uniforms() -> None:
    widths = torch.tensor([1.0, 2.0, 5.0, 10.0])
    x = torch.rand(50_000, 4, generator=gen(3)) * widths  # U(0, w) per channel
    for obs in (PercentileObserver(axis=1, percentile=99, symmetric=False),
                HistogramObserver(axis=1, method="percentile", percentile=99, symmetric=False)):
        lo, hi = feed(obs, x).range()
        torch.testing.assert_close(hi, 0.99 * widths, rtol=0.01, atol=0)
        torch.testing.assert_close(lo, 0.01 * widths, rtol=0.1, atol=0)


def test_histogram_regrows_range_and_conserves_counts() -> None:
    obs = HistogramObserver(method="percentile", percentile=99.9, bins=512, symmetric=False)
    x = X_NORMAL[:100_000]
    order = torch.argsort(x.abs())  # small values first: the range grows with every batch
    feed(obs, x[order], 10)
    assert obs.hist is not None and float(obs.hist.sum()) == pytest.approx(100_000)
    lo, hi = obs.range()
    assert abs(float(hi) - normal_quantile(0.999)) < 0.1


def test_sample_store_bounded_and_uniform() -> None:
    store = SampleStore(max_samples=20_000, seed=0)
    for k in range(10):  # ten batches with means 0 … 9: a uniform sample has mean 4.5
        store.add(torch.full((1, 10_000), float(k)))
    assert store.data is not None and store.data.shape == (1, 20_000) and store.seen == 100_000
    assert abs(float(store.data.mean()) - 4.5) < 0.1


def test_percentile_observer_subsamples_long_streams() -> None:
    obs = PercentileObserver(percentile=99.0, symmetric=False, max_samples=50_000)
    lo, hi = feed(obs, X_NORMAL, 20).range()
    assert abs(float(hi) - normal_quantile(0.99)) < 0.05


# -------------------------------------------------------------------------------- entropy
def test_entropy_clips_outliers() -> None:
    x = torch.cat([X_NORMAL[:200_000], torch.tensor([40.0, -55.0, 70.0])])
    obs = HistogramObserver(method="entropy", bins=1024)
    obs.observe(x)
    lo, hi = obs.range()
    assert float(hi) < 0.2 * 70  # the outliers are clipped …
    assert float(hi) > 2.5       # … the bulk is not
    assert float(lo) == -float(hi)


def test_entropy_without_outliers_keeps_most_of_a_normal() -> None:
    obs = HistogramObserver(method="entropy", bins=1024, bits=8)
    obs.observe(X_NORMAL[:200_000])
    t = float(obs.range()[1])
    assert 2.5 < t <= float(X_NORMAL[:200_000].abs().max()) + 1e-6


def test_entropy_per_channel_tracks_scale() -> None:
    x = torch.randn(50_000, 3, generator=gen(4)) * torch.tensor([1.0, 4.0, 16.0])
    obs = HistogramObserver(axis=-1, method="entropy", bins=512)
    obs.observe(x)
    _, hi = obs.range()
    ratio = hi / torch.tensor([1.0, 4.0, 16.0])
    assert float(ratio.max() / ratio.min()) < 1.3  # same shape, scaled threshold


def test_entropy_needs_symmetric() -> None:
    with pytest.raises(SchemeError, match="symmetric"):
        HistogramObserver(method="entropy", symmetric=False)


# ------------------------------------------------------------------------------------ MSE
@pytest.mark.parametrize("bits", [4, 8])
def test_mse_beats_minmax_on_heavy_tails(bits: int) -> None:
    x = student_t(100_000, df=3, seed=5)
    mse = MSEObserver(bits=bits)
    mse.observe(x)
    lo, hi = mse.range()
    mm_lo, mm_hi = x.min(), x.max()
    rows = x.view(1, -1)

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((fake_quantize(rows, a.view(1, 1), b.view(1, 1), bits, True) - rows)
                     .pow(2).mean())

    assert err(lo, hi) < 0.8 * err(mm_lo, mm_hi)
    assert float(hi) < float(x.abs().max())  # it clipped


def test_mse_per_channel_asymmetric() -> None:
    x = torch.rand(20_000, 2, generator=gen(6)) * torch.tensor([1.0, 3.0]) + torch.tensor([0.0,
                                                                                          -1.0])
    obs = MSEObserver(axis=1, bits=4, symmetric=False)
    feed(obs, x, 4)
    lo, hi = obs.range()
    assert lo.shape == (2,)
    # a uniform distribution has no tail to clip: the best range is (nearly) the full range
    torch.testing.assert_close(hi, x.amax(0), rtol=0.05, atol=0)
    torch.testing.assert_close(lo, x.amin(0).clamp(max=0), rtol=0.05, atol=0.01)


# ----------------------------------------------------------------------------- interface
def test_interface_errors() -> None:
    with pytest.raises(SchemeError, match="before observe"):
        MinMaxObserver().range()
    obs = MinMaxObserver(axis=1)
    obs.observe(torch.zeros(2, 3))
    with pytest.raises(SchemeError, match="channels"):
        obs.observe(torch.zeros(2, 4))
    with pytest.raises(SchemeError, match="axis"):
        MinMaxObserver(axis=3).observe(torch.zeros(2, 3))
    with pytest.raises(SchemeError):
        MovingAverageMinMaxObserver(averaging_constant=0)


def test_observers_are_independent() -> None:
    a, b = MinMaxObserver(), MinMaxObserver()
    a.observe(torch.tensor([1.0, 2.0]))
    b.observe(torch.tensor([-5.0, 5.0]))
    assert float(a.range()[1]) == 2.0 and float(b.range()[1]) == 5.0


def test_constant_input_gives_finite_ranges() -> None:
    for obs in (HistogramObserver(method="percentile", symmetric=False),
                HistogramObserver(bins=256),
                MSEObserver(), PercentileObserver()):
        obs.observe(torch.full((100,), 2.0))
        lo, hi = obs.range()
        assert math.isfinite(float(lo)) and math.isfinite(float(hi)) and float(hi) >= float(lo)
