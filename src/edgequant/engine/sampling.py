"""Sampling: per-request parameters and the pure choice of one next token from a logits row.

Numpy only (no torch): the llama.cpp engine, and a measuring subprocess that runs a GGUF
file, use it without loading torch.

The order is llama.cpp's and vLLM's: temperature, then top-k, then top-p, then one draw from
the renormalized distribution. Temperature 0 is greedy and exactly ``argmax`` (the first
index among equal maxima), whatever top-k or top-p say; top-k 1 is the same token. A draw
uses the request's own ``numpy.random.Generator``, so one seed gives one token sequence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from ..errors import EdgequantError

FinishReason = Literal["stop", "length", "eos"]
# a top-p nucleus is searched among this many most likely tokens first (a full sort of a
# 150k-token vocabulary per step costs more than the decode step of a small model)
_NUCLEUS_FIRST = 1024


class EngineError(EdgequantError, ValueError):
    """An engine asked to do something it cannot: bad sampling parameters, a prompt that does
    not fit, a released or foreign state, a model without a chat template."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses and stops its tokens.

    Args:
        max_tokens: most new tokens (0: none; generation then ends at once with
            ``"length"``).
        temperature: divides the logits; 0 is greedy (argmax).
        top_k: keep the ``k`` most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches
            ``top_p`` (1: all).
        seed: seeds the request's generator: the same seed, prompt and model give the same
            tokens. None draws a fresh seed from the OS. Deterministic by default.
        stop: strings that end generation; the text is cut before the first one, which is
            never streamed.
        stop_token_ids: tokens that end generation (``finish_reason="stop"``).
        ignore_eos: keep generating past end-of-generation tokens (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_int("max_tokens", self.max_tokens, 0)
        _check_int("top_k", self.top_k, 0, "(0 keeps all tokens)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "(or None for a fresh one)")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) \
                or t < 0:
            raise EngineError(f"temperature must be a finite number ≥ 0 (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise EngineError(f"top_p must be in (0, 1] (1 keeps all tokens), got {p!r}")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise EngineError(f"stop strings must be non-empty strings, got {s!r}")
        for tok in self.stop_token_ids:
            _check_int("stop_token_ids items", tok, 0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_int(name: str, value: Any, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise EngineError(f"{name} must be an integer ≥ {low}{' ' + hint if hint else ''}, "
                          f"got {value!r}")


def greedy(logits: np.ndarray) -> int:
    """The most likely token: the first index of the maximum."""
    return int(np.argmax(logits))


def candidates(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """The tokens a draw may choose and their probabilities, most likely first.

    Args:
        logits: ``(V,)`` one row.
        temperature: > 0.
        top_k, top_p: as in :class:`SamplingParams`.

    Returns:
        ``(ids, probs)``: ``(n,)`` int64 token ids in descending probability (ties: lower id
        first) and ``(n,)`` float64 probabilities summing to 1.
    """
    x = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    v = x.shape[0]
    k = v if top_k <= 0 else min(top_k, v)
    if top_p >= 1:
        ids = _top(x, k)
        w = np.exp(x[ids] - x[ids[0]])
        return ids, w / w.sum()
    # the nucleus is a prefix of the top-k tokens in descending order: search the most
    # likely few first, and more only when their mass falls short of p
    pool = np.arange(v) if k == v else np.argpartition(-x, k - 1)[:k]
    top = float(x[pool].max())
    total = float(np.exp(x[pool] - top).sum())
    m = min(k, _NUCLEUS_FIRST)
    while True:
        ids = _top(x, m) if m < k else pool[np.lexsort((pool, -x[pool]))]
        w = np.exp(x[ids] - top)
        cum = np.cumsum(w) / total
        # the smallest prefix whose mass reaches p (a tolerance for float rounding)
        n = int(np.searchsorted(cum, top_p * (1 - 1e-9), side="left")) + 1
        if n <= m or m == k:
            ids, w = ids[:n], w[:n]
            return ids, w / w.sum()
        m = min(k, m * 8)


def _top(x: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest values of ``x``, descending, ties by lower index."""
    part = np.argpartition(-x, n - 1)[:n] if n < x.shape[0] else np.arange(x.shape[0])
    return part[np.lexsort((part, -x[part]))]


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One next token from ``logits`` (``(V,)``) under ``params``, drawing from ``rng``."""
    if params.greedy:
        return greedy(logits)
    ids, probs = candidates(logits, params.temperature, params.top_k, params.top_p)
    u = rng.random()
    i = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    return int(ids[min(i, len(ids) - 1)])


def new_rng(seed: int | None) -> np.random.Generator:
    """The request's generator (``seed`` None: fresh OS entropy)."""
    return np.random.default_rng(seed)


def as_params(params: SamplingParams | None, overrides: dict[str, Any]) -> SamplingParams:
    """``params`` with ``overrides`` applied (``generate(..., max_tokens=16)``)."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(SamplingParams)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise EngineError(f"unknown sampling parameter(s) {', '.join(bad)}; known: "
                          f"{', '.join(sorted(known))}")
    base = params if params is not None else SamplingParams()
    return replace(base, **overrides) if overrides else base

