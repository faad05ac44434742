"""Time the default evaluation of SmolLM2-135M — the honest yardstick's own cost.

The model evaluated is the zoo's SmolLM2 quantized with RTN ``w4g128`` and saved as a native
artifact (made first, not timed). The evaluation is ``eq.evaluate``'s default set plus KLD
and two tasks — what ``edgequant eval ART --kld-base smollm2-135m --tasks hellaswag,arc_easy
--limit 200`` runs — done as four ``evaluate`` calls so each step is timed (wall and CPU
seconds) and recorded even if a later one fails; the file is rewritten after every step:

* perplexity over the first 8,192 tokens of ``wiki`` (16 windows of 512) and, in the same
  pass, KL divergence against the fp32 base (whose distributions are computed once and
  cached — ``kld_base_cached`` says which case a run was);
* 200 items each of HellaSwag and ARC-Easy (seeded subsets);
* speed (512-token prefill, 128 decode steps, median of 3 after a warm-up) and peak RSS, in
  one fresh subprocess;
* size.

    python benchmarks/bench_eval.py              # writes benchmarks/results/eval.json
    python benchmarks/bench_eval.py --kld-check  # also: cached KLD vs exact full-row KLD

``--kld-check`` compares the cached (top-k head + tail quantiles) KLD with the exact one from
full logits for RTN w8/w4g128/w3g128 on ``--check-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def _machine() -> dict[str, Any]:
    import torch

    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "load_average_before": os.getloadavg()}


def _cpu_s() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), \
        resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def kld_check(model_name: str, tokens: int) -> dict[str, Any]:
    """Cached-KLD estimate vs the exact full-row KLD for three RTN schemes."""
    import torch

    import edgequant as eq
    from edgequant.data import corpus_tokens
    from edgequant.eval.kld import kld_exact, kld_rows, reference_rows
    from edgequant.eval.perplexity import make_windows

    model = eq.load(model_name)
    base = eq.open(model)
    w = make_windows(corpus_tokens("wiki", base), 512, base.bos_id, max_tokens=tokens)
    base_logits = [base.logits(w.tokens[i].tolist())[:-1] for i in range(w.n)]
    out: dict[str, Any] = {"positions": w.tokens_scored}
    for scheme in ("w8", "w4g128", "w3g128"):
        q = eq.open(eq.quantize(model, "rtn", scheme=scheme))
        exact, est = [], []
        for i, b in enumerate(base_logits):
            lq = q.logits(w.tokens[i].tolist())[:-1]
            exact.append(kld_exact(b, lq))
            est.append(kld_rows(lq, reference_rows(b, w.targets(i)))[0])
        e, c = torch.cat(exact), torch.cat(est)
        out[scheme] = {"exact_mean": float(e.mean()), "cached_mean": float(c.mean()),
                       "rel_err_mean": float(c.mean() / e.mean() - 1),
                       "exact_median": float(e.median()), "cached_median": float(c.median()),
                       "exact_p99": float(torch.quantile(e, 0.99)),
                       "cached_p99": float(torch.quantile(c, 0.99))}
        print(scheme, out[scheme], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="w4g128")
    ap.add_argument("--tasks", default="hellaswag,arc_easy")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "eval.json")
    ap.add_argument("--kld-check", action="store_true")
    ap.add_argument("--check-tokens", type=int, default=2048)
    args = ap.parse_args()

    import edgequant as eq

    record: dict[str, Any] = {"benchmark": "bench_eval", "machine": _machine(),
                              "args": {k: str(v) for k, v in vars(args).items()}, "steps": {}}
    steps = [("ppl+kld", ["ppl", "kld"]), ("tasks", ["tasks"]), ("size", ["size"]),
             ("speed+memory", ["speed", "memory"])]
    merged: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        t0 = time.perf_counter()
        art = eq.quantize(args.model, "rtn", scheme=args.scheme).save(Path(tmp) / "art")
        record["prepare_s"] = time.perf_counter() - t0
        for name, metrics in steps:  # one evaluate per step: a failing step loses only itself
            t0, c0 = time.perf_counter(), _cpu_s()
            try:
                res = eq.evaluate(str(art), metrics, kld_base=args.model, tasks=args.tasks,
                                  limit=args.limit, max_tokens=args.max_tokens)
                step: dict[str, Any] = {"ok": True}
                _merge(merged, res.to_dict())
            except Exception as e:  # noqa: BLE001 - recorded, and the next step still runs
                step = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            # CPU seconds of this process and its children (the speed/memory subprocess): on a
            # busy machine the wall time mostly measures the neighbours
            step.update(wall_s=time.perf_counter() - t0, cpu_s=_cpu_s() - c0)
            record["steps"][name] = step
            print(name, json.dumps(step), flush=True)
            record["result"] = merged
            _write(args.out, record)
    record["eval_wall_s"] = sum(s["wall_s"] for s in record["steps"].values())
    record["eval_cpu_s"] = sum(s["cpu_s"] for s in record["steps"].values())
    record["machine"]["load_average_after"] = os.getloadavg()
    merged.pop("generations", None)
    print(json.dumps({k: merged.get(k) for k in (
        "ppl", "ppl_base", "kld_mean", "kld_p99", "top1", "prefill_tps", "decode_tps",
        "peak_rss_mb", "bits_per_weight", "kld_base_cached")}, indent=1))
    print("tasks", json.dumps(merged.get("tasks")), f"\neval wall {record['eval_wall_s']:.1f} s",
          flush=True)
    if args.kld_check:
        record["kld_check"] = kld_check(args.model, args.check_tokens)
    _write(args.out, record)
    print(f"wrote {args.out}")


def _merge(into: dict[str, Any], d: dict[str, Any]) -> None:
    for k, v in d.items():
        if k == "timings":
            into.setdefault(k, {}).update(v)
        elif k in ("metrics", "notes"):
            into.setdefault(k, []).extend(x for x in v if x not in into[k])
        elif v not in (None, {}, []) or k not in into:
            into[k] = v


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
