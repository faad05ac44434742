"""Every method on SmolLM2-135M: quantization wall time and peak RSS, then quality.

Each (method, scheme) runs in its own fresh Python process, so its peak RSS (``VmHWM``: the
process's own high-water mark, see ``edgequant.eval.memory``) holds exactly one job: the
model, the calibration activations, the method's statistics and the quantized copy. The
child times loading, building the calibration windows (tokenizing the corpus; cached after
the first run) and quantizing apart; ``quantize_s`` is the pipeline alone. Calibration is
the library default (128 windows × 512 tokens of ``wiki``, seeded) unless ``--calib-samples``
/ ``--calib-len`` say otherwise. The peak is read before anything else happens; then the same
process measures the quantized model with the yardstick (``eq.evaluate``: perplexity on the
first ``--max-tokens`` tokens of ``wiki`` in windows of 512, KL divergence and top-1 agreement
against the fp32 model on the same windows, whose distributions are cached after the first
job). A ``baseline`` job measures the unquantized model. Results go to
``benchmarks/results/methods.json`` and a Markdown table beside it, rewritten after every job
so an interrupted run keeps what it had.

    python benchmarks/bench_methods.py                       # every job below
    python benchmarks/bench_methods.py --only gptq:w4g128    # one job
    python benchmarks/bench_methods.py --append --only static:w8a8-static:observer=entropy

The issue's target: GPTQ ``w4g128`` in ≤ 5 minutes with peak RSS ≤ 3 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent

JOBS = ("baseline", "rtn:w4g128", "rtn:w3g128", "rtn:w4g128-asym", "rtn:w3g128-asym",
        "hqq:w4g64-asym", "hqq:w4g128-asym", "hqq:w3g128-asym", "hqq:w3g128", "gptq:w4g128",
        "gptq:w3g128", "awq:w4g128", "awq:w3g128", "smoothquant:w8a8", "dynamic:w8a8",
        "static:w8a8-static",
        "static:w8a8-static:observer=percentile", "static:w8a8-static:observer=entropy",
        "smoothquant:w8a8-static")

_CHILD = """\
import json, sys, time
t0 = time.perf_counter()
import edgequant as eq
from edgequant.data.calibration import CalibrationSpec
from edgequant.eval.memory import _peak_rss_mb
req = json.loads(sys.argv[1])
t1 = time.perf_counter()
model = eq.load(req["model"])
t2 = time.perf_counter()
calib = None
if req["method"] == "baseline":
    q, t3 = model, time.perf_counter()
else:
    if eq.Recipe.parse(req["method"], req["scheme"], req["options"]).needs_calibration:
        calib = CalibrationSpec(n=req["calib_samples"], seq_len=req["calib_len"]).build(
            model.tokenizer)
    t3 = time.perf_counter()
    q = eq.quantize(model, req["method"], scheme=req["scheme"], calib=calib, inplace=True,
                    **req["options"])
t4 = time.perf_counter()
out = {"import_s": t1 - t0, "load_s": t2 - t1, "calib_s": t3 - t2, "quantize_s": t4 - t3,
       "peak_rss_mb": _peak_rss_mb(), "bits_per_weight": q.summary()["bits_per_weight"],
       "bits_per_weight_total": q.summary()["bits_per_weight_total"],
       "calibration": q.calibration}
if req["max_tokens"]:
    res = eq.evaluate(q, ["ppl", "kld"], kld_base=req["model"], max_tokens=req["max_tokens"])
    d = res.to_dict()
    out.update({k: d.get(k) for k in ("ppl", "tokens_scored", "kld_mean", "kld_p99", "top1")})
    out["eval_s"] = time.perf_counter() - t4
print("RESULT " + json.dumps(out))
"""


def run_job(job: str, args: argparse.Namespace) -> dict[str, Any]:
    method, _, rest = job.partition(":")
    scheme, _, opts = rest.partition(":")
    scheme = scheme or "fp32"
    from edgequant.methods.registry import parse_options  # as --set and --methods parse

    options = parse_options([o for o in opts.split(",") if o], job)
    req = {"model": args.model, "method": method, "scheme": scheme,
           "calib_samples": args.calib_samples, "calib_len": args.calib_len,
           "max_tokens": args.max_tokens, "options": options}
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(req)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    row: dict[str, Any] = {"job": job, "method": method, "scheme": scheme, "options": options,
                           "wall_s": wall,
                           "load_average": os.getloadavg()}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            row.update(json.loads(line[7:]))
            return row
    row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return row


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    tmp.replace(out)
    lines = [f"# Quantization cost: {meta['model']}, {meta['cpus']} CPUs",
             "",
             f"Calibration (GPTQ, AWQ, SmoothQuant, static): {meta['calib_samples']} × "
             f"{meta['calib_len']} tokens of `wiki`. Each job is a fresh process; "
             "`quantize s` is the pipeline alone (loading and tokenizing apart); peak RSS is "
             "the process's VmHWM when quantization ends. Load average is the machine's "
             "1-minute figure after the job. PPL on the first "
             f"{meta['max_tokens']} tokens of `wiki` (ctx 512); KLD and top-1 against the "
             "fp32 model on the same tokens. bits/weight: the quantized linear layers "
             "(whole model in brackets: embeddings stay fp16).",
             "", "| method | scheme | bits/weight | PPL | KLD | top-1 % | quantize s | "
             "peak RSS MB | load avg |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['scheme']} | error: {r['error']} |||||||")
            continue
        top1 = None if r.get("top1") is None else 100 * r["top1"]
        opts = "".join(f" {k}={v}" for k, v in r.get("options", {}).items())
        lines.append(f"| {r['method']}{opts} | {r['scheme']} | "
                     f"{f(r['bits_per_weight'], '.3f')} "
                     f"({r['bits_per_weight_total']:.2f}) | {f(r.get('ppl'), '.3f')} | "
                     f"{f(r.get('kld_mean'), '.4f')} | {f(top1, '.2f')} | "
                     f"{r['quantize_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['load_average'][0]:.1f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", default="", help="comma-separated jobs (default: all)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=8192,
                    help="PPL/KLD tokens after quantizing (0: time and memory only)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "methods.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out (a job run again replaces its row)")
    args = ap.parse_args()
    jobs = [j.strip() for j in args.only.split(",") if j.strip()] or list(JOBS)
    meta = {"benchmark": "bench_methods", "model": args.model, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": len(os.sched_getaffinity(0)),
            "calib_samples": args.calib_samples, "calib_len": args.calib_len,
            "max_tokens": args.max_tokens, "load_average_before": os.getloadavg()}
    rows: list[dict[str, Any]] = []
    if args.append and args.out.exists():
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["job"] not in jobs]
    for job in jobs:
        row = run_job(job, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(rows, meta, args.out)


if __name__ == "__main__":
    main()
