"""Multiple-choice accuracy by log-likelihood, as lm-evaluation-harness 0.4 scores it.

For each choice, the request ``(context, continuation)`` is tokenized as lm-eval's
``_encode_pair`` does (trailing spaces of the context move to the continuation; the pair is
encoded whole and split at the context's length), BOS is prepended exactly when the
tokenizer adds one by default (lm-eval's ``add_bos_token=None``), and the continuation's
log-likelihood is the sum of its tokens' log-probs. Then:

- ``acc``: the choice with the highest log-likelihood is the gold one;
- ``acc_norm``: the same after dividing each log-likelihood by ``len(choice)`` — lm-eval's
  code divides by the *character* length of the choice string (its docs say bytes);
- ``acc_bytes``: dividing by the UTF-8 byte length (lm-eval's ``acc_bytes``).

Winogrande has one context per option and a shared continuation; lm-eval defines only
``acc`` for it, so ``acc_norm`` and ``acc_bytes`` are None there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..data.tasks import MCItem
from ..progress import Progress

MAX_LENGTH = 2048  # lm-eval's default max_length; longer requests are cut on the left
_ITEMS_PER_CALL = 16


def encode_pair(runnable: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context ids, continuation ids)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = runnable.tokenize(context + continuation)
    ctx = runnable.tokenize(context)
    return ctx, whole[len(ctx):]


def request_tokens(runnable: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """The token ids to run (context + continuation minus the last token, left-truncated to
    ``MAX_LENGTH``) and how many trailing positions predict the continuation."""
    ctx, cont = encode_pair(runnable, context, continuation)
    if runnable.add_bos or not ctx:
        ctx = [runnable.bos_id, *ctx]
    limit = min(MAX_LENGTH, runnable.max_context)
    full = (ctx + cont)[-(limit + 1):]
    return full, len(cont)


def loglikelihoods(runnable: Any, items: Sequence[Sequence[tuple[str, str]]]
                   ) -> list[list[float]]:
    """Sum of continuation log-probs of each ``(context, continuation)``, per item.

    An item's requests are scored as one tree (:meth:`Runnable.logits_shared`): their
    longest common token prefix (the shared context) and each request's rest, so a backend
    can compute the context once.
    """
    import torch

    encoded = [[request_tokens(runnable, c, x) for c, x in item] for item in items]
    trees, last = [], []
    for item in encoded:
        seqs = [full[:-1] for full, _ in item]
        p = _common_prefix(seqs)
        trees.append((seqs[0][:p], [s[p:] for s in seqs]))
        last.append([min(max(1, n), len(full) - 1) for full, n in item])
    logits = runnable.logits_shared(trees, last)
    out: list[list[float]] = []
    for item, rows_per_request in zip(encoded, logits, strict=True):
        out.append([])
        for (full, n_cont), rows in zip(item, rows_per_request, strict=True):
            if n_cont == 0:
                out[-1].append(0.0)
                continue
            targets = torch.tensor(full[-n_cont:], dtype=torch.long)
            lp = torch.log_softmax(rows[-n_cont:].double(), dim=-1)
            out[-1].append(float(lp.gather(1, targets[:, None]).sum()))
    return out


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs``."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def score_items(runnable: Any, items: Sequence[MCItem], progress: Progress | None = None,
                what: str = "task") -> dict[str, Any]:
    """``acc``, ``acc_norm``, ``acc_bytes``, their standard errors, and ``n``."""
    track = progress or (lambda it, total, w: it)
    hits: dict[str, list[float]] = {"acc": [], "acc_norm": [], "acc_bytes": []}
    chunks = [items[s:s + _ITEMS_PER_CALL] for s in range(0, len(items), _ITEMS_PER_CALL)]
    bar = track(range(len(items)), len(items), what)
    ticks = iter(bar)
    for chunk in chunks:
        reqs = [list(zip(it.contexts, it.continuations, strict=True)) for it in chunk]
        for it, ll in zip(chunk, loglikelihoods(runnable, reqs), strict=True):
            hits["acc"].append(float(_argmax(ll) == it.gold))
            if it.norm_texts is not None:
                chars = [v / len(t) for v, t in zip(ll, it.norm_texts, strict=True)]
                nbytes = [v / len(t.encode()) for v, t in zip(ll, it.norm_texts, strict=True)]
                hits["acc_norm"].append(float(_argmax(chars) == it.gold))
                hits["acc_bytes"].append(float(_argmax(nbytes) == it.gold))
            next(ticks, None)
    for _ in ticks:  # drain the progress bar
        pass
    out: dict[str, Any] = {"n": len(items)}
    for name, h in hits.items():
        out[name] = sum(h) / len(h) if h else None
        out[f"{name}_stderr"] = _stderr(h) if h else None
    return out


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
