"""KL divergence from a base model, with the base's distributions cached compactly on disk.

``KLD(P‖Q) = Σ_v P(v) (log P(v) − log Q(v))`` per scored position, P the base, Q the model
under test, over exactly the positions perplexity scores (:mod:`edgequant.eval.perplexity`).

**What is cached, and why it stays exact enough.** Full log-softmax rows cost ``2·V`` bytes
per position even in fp16 (8k positions × 49k vocabulary = 0.8 GB; Gemma's 262k: 4 GB). So per
position the cache keeps (log-probs computed in float64, stored as float32, ids as int32):

- the base's ``k`` most likely tokens and their log-probs (the *head*), exactly;
- ``log P(tail)``, the log of the mass outside the head;
- ``m`` *tail quantile tokens*: sort the tail by probability, and take the token at each
  cumulative-mass point ``(j + ½)/m`` of the tail (a token heavier than ``1/m`` of the tail
  appears several times) — with their log-probs.

Then, with the test model's full row ``log Q`` in float64,

    KLD ≈ Σ_{v∈head} P(v) (log P(v) − log Q(v))  +  P(tail) · mean_j (log P(t_j) − log Q(t_j))

The head term is exact; the tail term is a stratified (systematic) quadrature of
``Σ_{v∈tail} P(v)(log P(v) − log Q(v)) = P(tail) · E_{v∼P|tail}[log P(v) − log Q(v)]``.
Against itself every term is 0, up to the float32 rounding of stored log-probs (≪ 1e-6).
Measured on SmolLM2-135M (1,022 positions, ctx 512) against the exact full-row KLD, the
default ``k = 256, m = 128`` (3 KB per position) gives mean KLD within +0.7% (RTN w8, KLD
0.004), +0.04% (w4g128, 0.60) and −0.01% (w3g128, 2.92); the median within 0.1% and the
99th percentile within +7.6% (w8), +1.2% (w4), 0.0% (w3) — per-position values carry the
quadrature's noise, means and medians hardly any. Merging the whole tail into one bucket
instead (no quantile tokens) read 6–10% low. ``benchmarks/bench_eval.py --kld-check``
repeats this measurement.
Top-1 agreement needs only the base's first token and is exact.

Caches live in ``<cache>/kld/`` keyed by the base's weights sha256, its backend, the tokenizer,
the exact windows, ``k`` and ``m``; a base that lives only in memory (no sha256 of its weights)
is never cached.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..cache import cache_root
from ..io_utils import atomic_file
from ..progress import Progress
from .perplexity import Windows

DEFAULT_TOPK = 256
DEFAULT_TAIL_SAMPLES = 128
CACHE_VERSION = 2
_CHUNK = 128  # rows per float64 softmax (memory: 128 × V × 8 bytes)



@dataclass
class BaseDistribution:
    """The base model's compact distributions at every scored position (window order)."""

    top_ids: torch.Tensor      # (N, k) int32, most likely first
    top_logp: torch.Tensor     # (N, k) float32
    tail_ids: torch.Tensor     # (N, m) int32, tail tokens at mass quantiles (j + ½)/m
    tail_logp: torch.Tensor    # (N, m) float32
    tail_mass: torch.Tensor    # (N,) float64, log P(tail)
    target_logp: torch.Tensor  # (N,) float64, log-prob of the true next token
    meta: dict[str, Any]

    FIELDS = ("top_ids", "top_logp", "tail_ids", "tail_logp", "tail_mass", "target_logp")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, f) for f in self.FIELDS}

    @staticmethod
    def of(t: dict[str, torch.Tensor], meta: dict[str, Any]) -> BaseDistribution:
        return BaseDistribution(t["top_ids"], t["top_logp"], t["tail_ids"], t["tail_logp"],
                                t["tail_mass"], t["target_logp"], meta)

    def rows(self, start: int, stop: int) -> BaseDistribution:
        return BaseDistribution.of({f: t[start:stop] for f, t in self.tensors().items()},
                                   self.meta)

    @staticmethod
    def concat(parts: list[BaseDistribution], meta: dict[str, Any]) -> BaseDistribution:
        return BaseDistribution.of({f: torch.cat([getattr(p, f) for p in parts])
                                    for f in BaseDistribution.FIELDS}, meta)


def reference_rows(logits: torch.Tensor, targets: torch.Tensor, k: int = DEFAULT_TOPK,
                   m: int = DEFAULT_TAIL_SAMPLES) -> BaseDistribution:
    """Compact summary of base logits ``(n, V)`` whose next tokens are ``targets`` ``(n,)``."""
    parts = []
    k = min(k, logits.shape[-1])
    m = m if k < logits.shape[-1] else 0
    for s in range(0, logits.shape[0], _CHUNK):
        lp = torch.log_softmax(logits[s:s + _CHUNK].double(), dim=-1)          # (c, V)
        slp, sid = lp.sort(dim=-1, descending=True)
        tail_lp, tail_id = slp[:, k:], sid[:, k:]                                 # (c, V-k)
        mass = tail_lp.logsumexp(-1) if m else torch.full((lp.shape[0],), float("-inf"),
                                                           dtype=torch.float64)
        if m:
            cdf = (tail_lp - mass[:, None]).exp().cumsum(-1)                       # (c, V-k)
            u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
            j = torch.searchsorted(cdf, u.expand(cdf.shape[0], m).contiguous())
            j = j.clamp(max=cdf.shape[1] - 1)                                     # (c, m)
            t_id, t_lp = tail_id.gather(1, j), tail_lp.gather(1, j)
        else:
            t_id = torch.zeros((lp.shape[0], 0), dtype=torch.long)
            t_lp = torch.zeros((lp.shape[0], 0), dtype=torch.float64)
        target = lp.gather(1, targets[s:s + _CHUNK, None].long())[:, 0]
        parts.append(BaseDistribution(sid[:, :k].int(), slp[:, :k].float(), t_id.int(),
                                      t_lp.float(), mass, target, {}))
    return BaseDistribution.concat(parts, {})


def kld_rows(logits: torch.Tensor, base: BaseDistribution) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KLD(base ‖ model) (float64) and whether the base's top token is also the
    model's top token, for model logits ``(n, V)`` at the positions of ``base``."""
    klds, top1 = [], []
    for s in range(0, logits.shape[0], _CHUNK):
        b = base.rows(s, s + _CHUNK)
        lq = torch.log_softmax(logits[s:s + _CHUNK].double(), dim=-1)
        lq_top = lq.gather(1, b.top_ids.long())
        lp_top = b.top_logp.double()
        kld = (lp_top.exp() * (lp_top - lq_top)).sum(-1)
        if b.tail_ids.shape[1]:
            diff = b.tail_logp.double() - lq.gather(1, b.tail_ids.long())
            kld = kld + torch.where(b.tail_mass > float("-inf"),
                                    b.tail_mass.exp() * diff.mean(-1), 0.0)
        klds.append(kld)
        top1.append(lq_top[:, 0] >= lq.max(-1).values)
    return torch.cat(klds), torch.cat(top1)


def kld_exact(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Exact per-row KLD(P‖Q) from full logits (float64); the yardstick for tests."""
    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def summarize(kld: torch.Tensor, top1: torch.Tensor) -> dict[str, float]:
    """Mean, median, 99th percentile and max of per-position KLD; top-1 agreement."""
    k = kld.double()
    return {"kld_mean": float(k.mean()), "kld_median": float(k.median()),
            "kld_p99": float(torch.quantile(k, 0.99)), "kld_max": float(k.max()),
            "top1": float(top1.double().mean())}


# --- the base cache -------------------------------------------------------------------------


def base_distribution(base: Any, windows: Windows, k: int = DEFAULT_TOPK,
                      m: int = DEFAULT_TAIL_SAMPLES, progress: Progress | None = None
                      ) -> BaseDistribution:
    """The base Runnable's top-k distributions over ``windows``, from the cache when there.

    Cached only when the base's weights have a sha256 (``identity()["weights_sha256"]``).
    """
    ident = base.identity()
    key_fields = {"v": CACHE_VERSION, "weights": ident.get("weights_sha256"),
                  "backend": base.backend, "tokenizer": base.tokenizer_fingerprint(),
                  "windows": windows.digest(), "k": k, "m": m}
    meta = {"base": _jsonable(ident), **key_fields, "cached": False}
    path = None
    if key_fields["weights"]:
        key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
        path = cache_root() / "kld" / f"{key[:40]}.safetensors"
        hit = _load(path, key_fields)
        if hit is not None:
            hit.meta = {**meta, "cached": True, "cache_file": str(path)}
            return hit
    parts = []
    track = progress or (lambda items, total, what: items)
    for i in track(range(windows.n), windows.n, "base model (KLD reference)"):
        logits = base.logits(windows.tokens[i].tolist())
        parts.append(reference_rows(logits[windows.first:-1], windows.targets(i), k, m))
    dist = BaseDistribution.concat(parts, meta)
    if path is not None:
        _save(path, dist, key_fields)
        dist.meta["cache_file"] = str(path)
    return dist


def _save(path: Path, dist: BaseDistribution, key_fields: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    tensors = {k: t.contiguous() for k, t in dist.tensors().items()}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"key": json.dumps(key_fields, sort_keys=True),
                                               "base": json.dumps(dist.meta.get("base"))})


def _load(path: Path, key_fields: dict[str, Any]) -> BaseDistribution | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("key") != json.dumps(key_fields, sort_keys=True):
                return None
            t = {k: f.get_tensor(k) for k in BaseDistribution.FIELDS}
    except (OSError, SafetensorError):
        return None
    return BaseDistribution.of(t, {})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))
