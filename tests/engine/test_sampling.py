"""Sampling parameters and the pure choice of a next token from a logits row."""

import numpy as np
import pytest

from edgequant.engine.sampling import (
    EngineError,
    SamplingParams,
    as_params,
    candidates,
    greedy,
    new_rng,
    sample,
)


def _rows(n: int = 20, v: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, v)).astype(np.float32) * 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": -0.5}, r"temperature must be a finite number ≥ 0 \(0 = greedy\), got -0.5"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\].*got 0.0"),
    ({"top_p": 1.5}, "top_p.*1.5"),
    ({"top_k": -1}, "top_k must be an integer ≥ 0.*got -1"),
    ({"top_k": 2.5}, "top_k.*2.5"),
    ({"max_tokens": -3}, "max_tokens must be an integer ≥ 0, got -3"),
    ({"seed": -1}, "seed.*got -1"),
    ({"stop": ["ok", ""]}, "stop strings must be non-empty strings, got ''"),
    ({"stop_token_ids": [3, -2]}, "stop_token_ids items.*got -2"),
])
def test_bad_parameters_are_named(kwargs, match):
    with pytest.raises(EngineError, match=match):
        SamplingParams(**kwargs)


def test_parameters_normalize_and_override():
    p = SamplingParams(stop="###", stop_token_ids=[5])
    assert p.stop == ("###",) and p.stop_token_ids == (5,) and p.greedy
    assert as_params(p, {"temperature": 0.5}).stop == ("###",)
    assert not as_params(p, {"temperature": 0.5}).greedy
    assert as_params(None, {}) == SamplingParams()
    with pytest.raises(EngineError, match="unknown sampling parameter.*max_new_tokens"):
        as_params(None, {"max_new_tokens": 3})


def test_greedy_is_exactly_argmax_first_of_ties():
    row = np.array([0.5, 2.0, -1.0, 2.0], dtype=np.float32)
    assert greedy(row) == 1
    for r in _rows():
        assert sample(r, SamplingParams(), new_rng(0)) == int(np.argmax(r))


def test_top_k_1_equals_greedy_at_any_temperature():
    for i, r in enumerate(_rows()):
        p = SamplingParams(temperature=2.0, top_k=1, seed=i)
        assert sample(r, p, new_rng(i)) == int(np.argmax(r))
    ids, probs = candidates(_rows()[0], 1.0, top_k=1)
    assert ids.tolist() == [int(np.argmax(_rows()[0]))] and probs.tolist() == [1.0]


def test_seeded_draws_repeat_and_seeds_differ():
    r = _rows(1)[0]
    p = SamplingParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        rng = new_rng(seed)
        return [sample(r, p, rng) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # p = .5 .3 .15 .05: the nucleus of 0.8 is {0, 1} (0.5 alone falls short, 0.8 reaches)
    logits = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    ids, probs = candidates(logits, 1.0, top_p=0.8)
    assert ids.tolist() == [1, 3]
    np.testing.assert_allclose(probs, [0.5 / 0.8, 0.3 / 0.8], rtol=1e-12)
    ids, _ = candidates(logits, 1.0, top_p=0.81)
    assert ids.tolist() == [1, 3, 0]
    ids, _ = candidates(logits, 1.0, top_p=0.5)
    assert ids.tolist() == [1]
    # temperature first: at T = 2 the probabilities flatten to ∝ sqrt(p)
    flat = np.sqrt([0.15, 0.5, 0.05, 0.3])
    flat /= flat.sum()
    ids, probs = candidates(logits, 2.0, top_p=0.9)
    want = np.argsort(-flat)
    n = int(np.searchsorted(np.cumsum(flat[want]), 0.9)) + 1
    assert ids.tolist() == want[:n].tolist()
    np.testing.assert_allclose(probs, flat[want[:n]] / flat[want[:n]].sum(), rtol=1e-12)


def test_top_k_then_top_p_is_a_mass_of_the_top_k():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    # top-k 2 renormalizes to 4/7, 3/7: top-p 0.5 keeps the first only
    ids, probs = candidates(logits, 1.0, top_k=2, top_p=0.5)
    assert ids.tolist() == [0] and probs.tolist() == [1.0]
    ids, probs = candidates(logits, 1.0, top_k=3)
    np.testing.assert_allclose(probs, [4 / 9, 3 / 9, 2 / 9], rtol=1e-12)


def test_a_wide_nucleus_searches_past_the_first_rows():
    # a flat row of 5000: the 0.9 nucleus holds 4500 tokens, past the first 1024 searched
    ids, probs = candidates(np.zeros(5000), 1.0, top_p=0.9)
    assert len(ids) == 4500 and ids.tolist() == list(range(4500))
    np.testing.assert_allclose(probs, 1 / 4500)


def test_draw_frequencies_follow_the_distribution():
    p = np.array([0.5, 0.25, 0.15, 0.1])
    params = SamplingParams(temperature=1.0)
    rng = new_rng(0)
    counts = np.bincount([sample(np.log(p), params, rng) for _ in range(20000)], minlength=4)
    # 4 standard deviations of a binomial at n = 20000
    assert np.all(np.abs(counts / 20000 - p) < 4 * np.sqrt(p * (1 - p) / 20000)), counts
