"""Which artifact to ship, per constraint — each answer names the cell it comes from.

Per model:

- **quality**: the smallest artifact whose perplexity is within ``tol`` (1 %) of the fp
  baseline's (same windows);
- **speed**: the fastest decode (tokens/s, fresh process), and the fastest within ``tol``;
- **memory budget**: for each budget N MB, the artifact of at most N MB (weights) with the
  lowest KLD against the baseline (ties: lower perplexity).

Across models (when there are several), :func:`equal_memory` pairs, per budget, the best cell
of each model. KLD and perplexity do not compare across tokenizers, so models are ranked by
mean task accuracy when every candidate has it, else by bits per byte of the scored text
(lower is better), which does not depend on the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..comparison.store import ResultRow

TOLERANCE = 0.01


@dataclass
class Pick:
    """One recommendation: the constraint, the chosen row (None: nothing qualifies), why."""

    model: str
    constraint: str
    row: ResultRow | None
    why: str


def baseline_of(rows: Sequence[ResultRow], model: str) -> ResultRow | None:
    return next((r for r in rows if r.model == model and r.kind == "baseline"), None)


def _ok(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def smallest_within(rows: Sequence[ResultRow], model: str, tol: float = TOLERANCE) -> Pick:
    base = baseline_of(rows, model)
    what = f"smallest with PPL within {tol:.0%} of the baseline"
    if base is None or not _ok(base.m("ppl")):
        return Pick(model, what, None, "no baseline perplexity to compare with")
    limit = base.m("ppl") * (1 + tol)  # type: ignore[operator]
    ok = [r for r in rows if r.model == model and _ok(r.m("ppl")) and _ok(r.m("size_mb"))
          and r.m("ppl") <= limit]  # type: ignore[operator]
    if not ok:
        return Pick(model, what, None, f"no artifact reaches PPL ≤ {limit:.3f}")
    best = min(ok, key=lambda r: (r.m("size_mb"), r.m("ppl")))
    return Pick(model, what, best, f"PPL {best.m('ppl'):.3f} ≤ {limit:.3f} "
                f"(baseline {base.m('ppl'):.3f}) at {best.m('size_mb'):.1f} MB")


def fastest_decode(rows: Sequence[ResultRow], model: str, tol: float | None = None) -> Pick:
    base = baseline_of(rows, model)
    cand = [r for r in rows if r.model == model and _ok(r.m("decode_tps"))]
    what = "fastest decode"
    if tol is not None:
        what += f" with PPL within {tol:.0%} of the baseline"
        if base is None or not _ok(base.m("ppl")):
            return Pick(model, what, None, "no baseline perplexity to compare with")
        limit = base.m("ppl") * (1 + tol)  # type: ignore[operator]
        cand = [r for r in cand if _ok(r.m("ppl")) and r.m("ppl") <= limit]  # type: ignore
    if not cand:
        return Pick(model, what, None, "no artifact qualifies")
    best = max(cand, key=lambda r: r.m("decode_tps"))  # type: ignore[arg-type, return-value]
    return Pick(model, what, best, f"{best.m('decode_tps'):.1f} tok/s decode, "
                f"PPL {_f(best.m('ppl'), 3)}")


def best_under(rows: Sequence[ResultRow], model: str, budget_mb: float) -> Pick:
    what = f"best under {budget_mb:g} MB"
    cand = [r for r in rows if r.model == model and _ok(r.m("size_mb"))
            and r.m("size_mb") <= budget_mb]  # type: ignore[operator]
    if not cand:
        return Pick(model, what, None, f"nothing is {budget_mb:g} MB or smaller")
    best = min(cand, key=lambda r: (_key(r.m("kld_mean")), _key(r.m("ppl"))))
    return Pick(model, what, best, f"KLD {_f(best.m('kld_mean'), 4)}, PPL "
                f"{_f(best.m('ppl'), 3)} at {best.m('size_mb'):.1f} MB")


def _key(v: float | None) -> float:
    return v if _ok(v) else math.inf  # type: ignore[return-value]


def _f(v: float | None, d: int) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def default_budgets(rows: Sequence[ResultRow]) -> list[float]:
    """Budgets that split the quantized artifacts: the 25th, 50th and 75th percentile of
    their sizes, rounded up to 10 MB (distinct, ascending)."""
    quantized = [r.m("size_mb") for r in rows if r.kind != "baseline"]
    sizes = sorted(v for v in quantized if v is not None and _ok(v))
    if not sizes:
        sizes = sorted(v for v in (r.m("size_mb") for r in rows) if v is not None and _ok(v))
    if not sizes:
        return []
    out = []
    for q in (0.25, 0.5, 0.75):
        v = sizes[min(len(sizes) - 1, int(q * len(sizes)))]
        out.append(float(math.ceil(v / 10.0) * 10))
    return sorted(set(out))


def recommendations(rows: Sequence[ResultRow], budgets: Sequence[float]) -> list[Pick]:
    picks = []
    for model in dict.fromkeys(r.model for r in rows):
        picks.append(smallest_within(rows, model))
        picks.append(fastest_decode(rows, model))
        picks.append(fastest_decode(rows, model, TOLERANCE))
        picks += [best_under(rows, model, b) for b in budgets]
    return picks


@dataclass
class Pairing:
    budget_mb: float
    measure: str  # "task_acc" (higher is better) or "bpb" (lower is better)
    best: dict[str, ResultRow | None]


def equal_memory(rows: Sequence[ResultRow], budgets: Sequence[float]) -> list[Pairing]:
    """For each budget, the best cell of every model within it (module docstring)."""
    models = list(dict.fromkeys(r.model for r in rows))
    measure = "task_acc" if rows and all(_ok(r.m("task_acc")) for r in rows) else "bpb"
    out = []
    for b in budgets:
        best: dict[str, ResultRow | None] = {}
        for model in models:
            cand = [r for r in rows if r.model == model and _ok(r.m("size_mb"))
                    and r.m("size_mb") <= b and _ok(r.m(measure))]  # type: ignore[operator]
            if measure == "task_acc":
                best[model] = max(cand, key=lambda r: r.m(measure), default=None)  # type: ignore
            else:
                best[model] = min(cand, key=lambda r: r.m(measure), default=None)  # type: ignore
        out.append(Pairing(b, measure, best))
    return out


def chat_pick(rows: Sequence[ResultRow]) -> ResultRow | None:
    """The artifact to chat with after a compare: the smallest within 1 % of the baseline's
    perplexity, else the lowest KLD under the middle memory budget — among artifacts that
    ``edgequant serve`` runs (GGUF files and native folders, not peer tools' formats)."""
    servable = [r for r in rows if r.kind in ("gguf", "native") and r.artifact]
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model and (r in servable or r.kind == "baseline")]
        pick = smallest_within(mine, model).row
        if pick is None or pick.kind == "baseline":
            budgets = default_budgets(mine)
            pick = best_under([r for r in mine if r.kind != "baseline"], model,
                              budgets[len(budgets) // 2]).row if budgets else None
        if pick is not None:
            return pick
    return None
