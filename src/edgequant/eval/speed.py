"""Speed: prefill and decode tokens per second, the same protocol for every backend.

One run = on a fresh engine state, a prefill of a fixed 512-token prompt (BOS + the first 511
tokens of the corpus stream) that yields the first new token, then 128 single-token greedy
decode steps on that state's KV cache — :meth:`~edgequant.engine.Engine.prefill` and
:meth:`~edgequant.engine.Engine.decode`, what every generation runs. ``prefill_tps = prompt
tokens / prefill seconds`` and ``decode_tps = new tokens / decode seconds``, each the median
over ``runs`` runs after ``warmup`` untimed runs (a warm-up run decodes 16 tokens: enough to
warm caches and allocators). Loading is never timed. The thread count the backend computed
with is recorded.

No torch here: :mod:`edgequant.eval.memory` runs this in a fresh process that, for a GGUF
file, holds only llama.cpp (and nothing but the standard library before the model loads).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.base import Engine

PROMPT_TOKENS = 512
NEW_TOKENS = 128
WARMUP_TOKENS = 16


@dataclass
class SpeedResult:
    prefill_tps: float
    decode_tps: float
    threads: int
    prompt_tokens: int
    new_tokens: int
    runs: int
    prefill_s: list[float]
    decode_s: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def speed_prompt(stream: Sequence[int] | None, bos_id: int, vocab_size: int,
                 n: int = PROMPT_TOKENS) -> list[int]:
    """BOS + the first ``n − 1`` tokens of ``stream`` (a fixed pseudo-random sequence of ids
    when the stream is too short or absent)."""
    body = [int(t) for t in stream[:n - 1]] if stream is not None else []
    if len(body) < n - 1:
        body = [(7919 * i + 13) % vocab_size for i in range(n - 1)]
    return [bos_id, *body]


def time_generation(engine: Engine, prompt_ids: Sequence[int], new_tokens: int,
                    capacity: int | None = None) -> tuple[float, float]:
    """One timed run: seconds for the prefill of ``prompt_ids`` (giving the first new
    token), and seconds for ``new_tokens`` greedy decode steps after it, on a fresh state
    (of ``capacity`` tokens; default just enough)."""
    from ..engine.sampling import greedy

    state = engine.new_state(capacity or len(prompt_ids) + new_tokens)
    try:
        t0 = time.perf_counter()
        tok = greedy(engine.prefill(state, prompt_ids))
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            tok = greedy(engine.decode(state, tok))
        t2 = time.perf_counter()
    finally:
        engine.release(state)
    return t1 - t0, t2 - t1


def measure_speed(engine: Engine, prompt_ids: Sequence[int], new_tokens: int = NEW_TOKENS,
                  runs: int = 3, warmup: int = 1) -> SpeedResult:
    """Median prefill and decode throughput of ``engine`` (see the module docstring)."""
    capacity = len(prompt_ids) + new_tokens   # every run's state the same size
    for _ in range(warmup):  # the full prefill, and enough decode steps to warm the cache
        time_generation(engine, prompt_ids, min(new_tokens, WARMUP_TOKENS), capacity)
    pre, dec = [], []
    for _ in range(max(runs, 1)):
        p, d = time_generation(engine, prompt_ids, new_tokens, capacity)
        pre.append(p)
        dec.append(d)
    p_med, d_med = statistics.median(pre), statistics.median(dec)
    return SpeedResult(len(prompt_ids) / p_med, new_tokens / d_med if d_med > 0 else float("inf"),
                       int(engine.threads), len(prompt_ids), new_tokens, len(pre), pre, dec)
