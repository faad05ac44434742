"""Aggregate decode speed of B concurrent sequences stepped together (continuous batching).

What ``edgequant serve --parallel N`` does each step: every active slot's generation
advances one token through one :meth:`Engine.step_batch` — one forward pass for all of them
(``decode_batch``). This measures the tokens per second all B sequences make together, for
B = 1, 2, 4, 8, on SmolLM2-135M as

* ``fp32``, ``bf16``: the zoo checkpoint in torch;
* ``rtn-w4g128``: the native RTN w4g128 artifact (``eq.quantize`` then save, opened in
  bfloat16: its 4-bit layers on the fused int4 CPU kernel);
* ``gguf``: the zoo's Q4_1 GGUF through llama.cpp (one ``llama_decode`` per step).

Each sequence's prompt is a different 64-token slice of the ``wiki`` corpus (BOS and 63
tokens); each decodes 64 tokens past the prompt's first sampled token (greedy,
``ignore_eos``). Prefill is done (per sequence, untimed) before the decode steps are timed.
One warm-up run per model, then the median of ``--reps`` runs. ``looped`` rows step the
same B generations one at a time (``Generation.step``: B forwards per step) — the speed
without batching, for comparison.

    python benchmarks/bench_batch_decode.py     # writes benchmarks/results/batch-decode.{json,md}

The machine is shared: the load average before and after each model is recorded.
``batch-decode-contended.*`` is the same run with ``--threads 1`` while other processes
held the load at 5–17 on the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgequant.comparison.runner import cpu_model

ROOT = Path(__file__).resolve().parent
PROMPT = 64
DECODE = 64
SIZES = (1, 2, 4, 8)


def _prompts(engine: Any, n: int) -> list[list[int]]:
    """``n`` different wiki slices of ``PROMPT`` tokens, each starting with BOS."""
    from edgequant.data import corpus_tokens

    ids = corpus_tokens("wiki", engine).tolist()
    step = PROMPT - 1
    return [[engine.bos_id, *ids[1000 + i * 4 * step:1000 + i * 4 * step + step]]
            for i in range(n)]


def _run(engine: Any, prompts: list[list[int]], batched: bool) -> float:
    """Decode tokens per second of all ``prompts`` together (prefill untimed)."""
    gens = [engine.start(p, max_tokens=DECODE + 1, ignore_eos=True) for p in prompts]
    try:
        for g in gens:
            g.step()                         # the prompt, and the first token
        t = time.perf_counter()
        while any(g.active for g in gens):
            if batched:
                engine.step_batch(gens)
            else:
                for g in gens:
                    if g.active:
                        g.step()
        dt = time.perf_counter() - t
    finally:
        for g in gens:
            g.close()
    bad = [g.error for g in gens if g.error is not None]
    if bad:
        raise bad[0]
    assert all(len(g.token_ids) == DECODE + 1 for g in gens)
    return len(prompts) * DECODE / dt


def measure(name: str, opener: Callable[[], Any], reps: int, looped: tuple[int, ...]
            ) -> dict[str, Any]:
    engine = opener()
    out: dict[str, Any] = {"model": name, "load_average_before": os.getloadavg(),
                           "runtime": getattr(engine, "runtime", None),
                           "threads": engine.threads, "rows": []}
    try:
        prompts = _prompts(engine, max(SIZES))
        _run(engine, prompts[:2], True)                       # warm-up
        cases = [(b, batched) for b in SIZES
                 for batched in ((True, False) if b in looped else (True,))]
        runs: dict[tuple[int, bool], list[float]] = {c: [] for c in cases}
        for _ in range(reps):          # interleaved: a change of load hits every case alike
            for b, batched in cases:
                runs[b, batched].append(_run(engine, prompts[:b], batched))
                print(name, b, "batched" if batched else "looped",
                      f"{runs[b, batched][-1]:.1f} tok/s", flush=True)
        for (b, batched), r in runs.items():
            out["rows"].append({"B": b, "mode": "batched" if batched else "looped",
                                "tok_s": statistics.median(r), "runs": r})
    finally:
        engine.close()
    out["load_average_after"] = os.getloadavg()
    base = next(r["tok_s"] for r in out["rows"] if r["B"] == 1 and r["mode"] == "batched")
    for r in out["rows"]:
        r["vs_B1"] = r["tok_s"] / base
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="fp32,bf16,rtn-w4g128,gguf")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--looped", default="4", help="B values also timed without batching")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and llama.cpp threads (default: torch's default, all CPUs)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "batch-decode.json")
    ap.add_argument("--table-only", action="store_true",
                    help="only write the .md table again from the existing --out JSON")
    args = ap.parse_args()
    if args.table_only:
        _write(args.out, json.loads(args.out.read_text()))
        return

    import torch

    import edgequant as eq
    from edgequant.models import zoo

    looped = tuple(int(b) for b in args.looped.split(",") if b)
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "what": f"aggregate decode tok/s of B sequences (wiki prompts of {PROMPT} tokens, "
                f"{DECODE} decoded each, greedy, ignore_eos; median of {args.reps})",
        "machine": {"cpu": cpu_model() or platform.processor(),
                    "cpus": len(os.sched_getaffinity(0)),
                    "python": sys.version.split()[0], "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "load_average_start": os.getloadavg()},
        "models": []}
    with tempfile.TemporaryDirectory() as scratch:
        def rtn() -> Any:
            art = Path(scratch) / "rtn-w4g128"
            if not art.exists():
                eq.quantize(eq.load("smollm2-135m"), "rtn", scheme="w4g128").save(art)
            return eq.open(art, dtype="bfloat16")

        openers: dict[str, Callable[[], Any]] = {
            "fp32": lambda: eq.open("smollm2-135m"),
            "bf16": lambda: eq.open("smollm2-135m", dtype="bfloat16"),
            "rtn-w4g128": rtn,
            "gguf": lambda: eq.open(zoo.fetch_gguf("smollm2-135m"), threads=args.threads,
                                    parallel=max(SIZES),
                                    n_ctx=max(SIZES) * (PROMPT + DECODE + 1)),
        }
        for name in args.models.split(","):
            record["models"].append(measure(name, openers[name], args.reps, looped))
            _write(args.out, record)
    record["machine"]["load_average_end"] = os.getloadavg()
    _write(args.out, record)


def _write(path: Path, record: dict[str, Any]) -> None:
    """The JSON and its table, each replaced atomically."""
    from edgequant.io_utils import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    with atomic_file(path.with_suffix(".md")) as tmp:
        tmp.write_text(_table(record))


def _table(record: dict[str, Any]) -> str:
    m = record["machine"]
    lines = [f"# Batched decode: {record['what']}", "",
             f"CPU: {m['cpu']} ({m['cpus']} cores, torch threads {m['torch_threads']}), "
             f"shared with other processes; load average at start "
             f"{', '.join(f'{x:.2f}' for x in m['load_average_start'])}, at the end "
             f"{', '.join(f'{x:.2f}' for x in m.get('load_average_end', []))}.", "",
             "The cases of a model run interleaved (B = 1, 2, 4, 8, looped 4; three times), so "
             "a change of load hits each alike (this run's own threads count in the load "
             "average). `looped`: the same B generations stepped "
             "one at a time (B forward passes per step)." + (
                 " With the machine this loaded, torch's two threads spin-waiting for each "
                 "other made a step ~10× slower than one thread, so torch and llama.cpp ran "
                 "on one thread (`--threads 1`)." if m["torch_threads"] == 1 else ""), "",
             "| model | B | mode | aggregate tok/s | × B=1 | load avg 1 min before/after |",
             "|---|---|---|---|---|---|"]
    for mod in record["models"]:
        la = f"{mod['load_average_before'][0]:.2f} / {mod.get('load_average_after', [0])[0]:.2f}"
        for r in mod["rows"]:
            lines.append(f"| {mod['model']} | {r['B']} | {r['mode']} | {r['tok_s']:.1f} | "
                         f"{r.get('vs_B1', float('nan')):.2f} | {la} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
