"""Perplexity over one fixed token stream, the same scored tokens for every backend.

**Windows.** The stream (a corpus tokenized once per tokenizer, :func:`corpus_tokens`) is cut
into ``n = min(len, max_tokens) // ctx`` non-overlapping windows of exactly ``ctx`` tokens:
window ``i`` is ``stream[i·ctx : (i+1)·ctx]`` with its first token *replaced* by BOS (as
llama.cpp's ``llama-perplexity`` does), so every window starts from the same state and no
window is ever padded; the tokens after the last full window are dropped.

**Scored tokens.** Logits at position ``j`` predict token ``j+1``. By default positions
``0 … ctx−2`` are scored: ``ctx − 1`` tokens per window (every token but the overwritten
first one). With ``half=True`` (``--ppl-half``, llama.cpp's convention) only positions
``ctx/2 … ctx−2`` count — ``ctx/2 − 1`` tokens per window, each with at least ``ctx/2`` tokens of
context — which reproduces ``llama-perplexity``'s numbers for the same tokens.

``ppl = exp(mean NLL)`` over all scored tokens, NLL computed in float64 from the float32
logits a backend returns.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DataError, EvaluationError

if TYPE_CHECKING:
    from .kld import BaseDistribution

from ..progress import Progress

_CHUNK = 128


@dataclass(frozen=True)
class Windows:
    """Evaluation windows: ``tokens`` ``(n, ctx)`` with BOS in column 0; logits positions
    ``first … ctx−2`` are scored."""

    tokens: torch.Tensor
    first: int

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def ctx(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def scored_per_window(self) -> int:
        return self.ctx - 1 - self.first

    @property
    def tokens_scored(self) -> int:
        return self.n * self.scored_per_window

    def targets(self, i: int) -> torch.Tensor:
        """The tokens predicted at the scored positions of window ``i``."""
        return self.tokens[i, self.first + 1:]

    def digest(self) -> str:
        h = hashlib.sha256(self.tokens.to(torch.int64).numpy().tobytes())
        h.update(f"{self.ctx}:{self.first}".encode())
        return h.hexdigest()


def make_windows(stream: torch.Tensor, ctx: int, bos_id: int, max_tokens: int | None = None,
                 half: bool = False) -> Windows:
    """Cut ``stream`` into full windows of ``ctx`` tokens (see the module docstring).

    Raises:
        DataError: fewer tokens than one window. EvaluationError: ``ctx`` too small.
    """
    if ctx < (4 if half else 2):
        raise EvaluationError(f"ctx must be at least {4 if half else 2}, got {ctx}")
    usable = stream.numel() if max_tokens is None else min(stream.numel(), max_tokens)
    n = usable // ctx
    if n == 0:
        cap = f" (max_tokens={max_tokens})" if max_tokens is not None and \
            max_tokens < stream.numel() else ""
        raise DataError(f"the text has {usable} tokens{cap}, fewer than one window of {ctx}; "
                        "give a longer text, more --max-tokens, or a smaller --ctx")
    tokens = stream[:n * ctx].to(torch.int64).reshape(n, ctx).clone()
    tokens[:, 0] = bos_id
    return Windows(tokens, ctx // 2 if half else 0)


def nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (float64) of ``targets`` ``(n,)`` under logits ``(n, V)``."""
    out = []
    for s in range(0, logits.shape[0], _CHUNK):
        rows = logits[s:s + _CHUNK].double()
        picked = rows.gather(1, targets[s:s + _CHUNK, None].long())[:, 0]
        out.append(rows.logsumexp(-1) - picked)
    return torch.cat(out)


@dataclass
class StreamScores:
    """Per scored token: NLL, and KLD and top-1 agreement when a base was given."""

    nll: torch.Tensor
    kld: torch.Tensor | None = None
    top1: torch.Tensor | None = None

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))


def score_windows(runnable: Any, windows: Windows, base: BaseDistribution | None = None,
                  progress: Progress | None = None) -> StreamScores:
    """One pass of ``runnable`` over ``windows``: NLL of every scored token, and, with a
    ``base`` distribution over the same windows, KLD and top-1 agreement."""
    from .kld import kld_rows

    per = windows.scored_per_window
    nll, kld, top1 = [], [], []
    track = progress or (lambda items, total, what: items)
    for i in track(range(windows.n), windows.n, "perplexity" + (" + KLD" if base else "")):
        logits = runnable.logits(windows.tokens[i].tolist())
        if logits.shape[0] != windows.ctx:
            raise EvaluationError(f"{runnable.name} returned {logits.shape[0]} logits rows for "
                                  f"a window of {windows.ctx} tokens")
        rows = logits[windows.first:-1]
        nll.append(nll_rows(rows, windows.targets(i)))
        if base is not None:
            k, t = kld_rows(rows, base.rows(i * per, (i + 1) * per))
            kld.append(k)
            top1.append(t)
    return StreamScores(torch.cat(nll), torch.cat(kld) if kld else None,
                        torch.cat(top1) if top1 else None)


def perplexity(runnable: Any, windows: Windows, progress: Progress | None = None) -> float:
    """``exp(mean NLL)`` of ``runnable`` over the scored tokens of ``windows``."""
    return score_windows(runnable, windows, progress=progress).ppl
