"""PNG plots of a compare run (matplotlib, Agg; no display needed).

- :func:`size_scatter`: size (MB) against KLD (log scale) or perplexity, one colour per
  model, the Pareto front (nothing both smaller and better) drawn and its points ringed;
- :func:`speed_bars`: prefill and decode tokens/s per cell;
- :func:`layer_heatmap`: per-layer relative weight error of each of our quantized artifacts,
  by block and by role (log colour scale).

Every function takes plain rows (``ResultRow``) and writes one file; nothing is recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..comparison.store import ResultRow

_MARKERS = {"baseline": "*", "native": "o", "gguf": "s", "peer": "^"}
_DPI = 110


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on
    both), ordered by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _ok(v: float | None) -> bool:
    return v is not None and not math.isnan(v) and not math.isinf(v)


def size_scatter(rows: Sequence[ResultRow], metric: str, path: Path, *, log: bool,
                 ylabel: str, title: str) -> Path:
    """``size_mb`` vs ``metric`` per model with its Pareto front."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    models = list(dict.fromkeys(r.model for r in rows))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    skipped = []
    for k, model in enumerate(models):
        pts = [r for r in rows if r.model == model and _ok(r.m("size_mb")) and _ok(r.m(metric))]
        if log:
            skipped += [r.label for r in pts if r.m(metric) <= 0]  # type: ignore[operator]
            pts = [r for r in pts if r.m(metric) > 0]  # type: ignore[operator]
        colour = colours[k % len(colours)]
        for r in pts:
            ax.scatter(r.m("size_mb"), r.m(metric), marker=_MARKERS.get(r.kind, "o"),
                       color=colour, s=60 if r.kind != "baseline" else 160, zorder=3)
            ax.annotate(f"{r.label} ({r.tool})" if r.kind == "peer" else r.label,
                        (r.m("size_mb"), r.m(metric)), textcoords="offset points",
                        xytext=(5, 4), fontsize=7)
        xy = [(r.m("size_mb"), r.m(metric)) for r in pts]
        front = pareto_front(xy)  # type: ignore[arg-type]
        if front:
            fx, fy = zip(*(xy[i] for i in front), strict=True)
            ax.step(fx, fy, where="post", color=colour, alpha=0.5, lw=1.2,
                    label=f"{model}: Pareto front")
            ax.scatter(fx, fy, s=180, facecolors="none", edgecolors=colour, lw=1.5, zorder=4)
        base = next((r for r in rows if r.model == model and r.kind == "baseline"), None)
        if metric == "ppl" and base is not None and _ok(base.m("ppl")):
            ax.axhline(base.m("ppl"), color=colour, ls=":", lw=1,
                       label=f"{model}: baseline PPL")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("size (MB, weights as stored)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if skipped:
        ax.text(0.01, 0.01, "not shown (0 on a log scale): " + ", ".join(skipped),
                transform=ax.transAxes, fontsize=7, alpha=0.7)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def speed_bars(rows: Sequence[ResultRow], path: Path) -> Path:
    """Horizontal bars: prefill and decode tokens/s per cell (fresh process each)."""
    plt = _plt()
    rows = [r for r in rows if _ok(r.m("decode_tps")) or _ok(r.m("prefill_tps"))]
    n = max(1, len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.32 * n), sharey=True)
    names = [_name(r, rows) for r in rows]
    for ax, metric, title in ((axes[0], "prefill_tps", "prefill tok/s"),
                              (axes[1], "decode_tps", "decode tok/s")):
        vals = [r.m(metric) if _ok(r.m(metric)) else 0.0 for r in rows]
        colours = ["#888888" if r.kind == "baseline" else "#1f77b4" if r.kind == "native"
                   else "#2ca02c" if r.kind == "gguf" else "#d62728" for r in rows]
        ax.barh(range(len(rows)), vals, color=colours)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
        ax.set_title(title)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)))
    axes[0].set_yticklabels(names, fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle("speed (grey: baseline, blue: edgequant torch, green: GGUF via llama.cpp, "
                 "red: peer tools)", fontsize=8)
    return _save(fig, path)


def _name(r: ResultRow, rows: Sequence[ResultRow]) -> str:
    multi = len({x.model for x in rows}) > 1
    return f"{r.model}: {r.label}" if multi else r.label


def layer_heatmap(series: Sequence[tuple[str, list[dict[str, Any]]]], path: Path,
                  title: str) -> Path:
    """``series``: (cell label, layer error rows) pairs. Two panels: mean relative error per
    block, and per role, one row per cell; log colour scale shared by both."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _plt()
    labels = [s[0] for s in series]
    blocks = sorted({e["block"] for _, errs in series for e in errs if e["block"] is not None})
    roles = list(dict.fromkeys(e["role"] for _, errs in series for e in errs))
    by_block = np.full((len(series), max(1, len(blocks))), np.nan)
    by_role = np.full((len(series), max(1, len(roles))), np.nan)
    for i, (_, errs) in enumerate(series):
        for j, b in enumerate(blocks):
            v = [e["rel_error"] for e in errs if e["block"] == b]
            by_block[i, j] = np.mean(v) if v else np.nan
        for j, role in enumerate(roles):
            v = [e["rel_error"] for e in errs if e["role"] == role]
            by_role[i, j] = np.mean(v) if v else np.nan
    finite = np.concatenate([by_block[np.isfinite(by_block)], by_role[np.isfinite(by_role)]])
    pos = finite[finite > 0]
    norm = LogNorm(vmin=float(pos.min()), vmax=float(pos.max())) if pos.size else None
    h = 1.4 + 0.35 * len(series)
    fig, axes = plt.subplots(1, 2, figsize=(13, h),
                             gridspec_kw={"width_ratios": [max(3, len(blocks)),
                                                           max(2, len(roles) * 1.6)]})
    for ax, data, xt, xl in ((axes[0], by_block, [str(b) for b in blocks], "block"),
                             (axes[1], by_role, roles, "role")):
        im = ax.imshow(np.where(data > 0, data, np.nan), aspect="auto", norm=norm,
                       cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(xt)))
        ax.set_xticklabels(xt, fontsize=6, rotation=90 if xl == "role" else 0)
        ax.set_xlabel(f"{xl} (mean ‖W−Ŵ‖/‖W‖ of its linears)")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0] else [], fontsize=7)
    fig.colorbar(im, ax=axes, fraction=0.03, pad=0.01, label="relative weight error")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path, tight=False)


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    plt = _plt()
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
