"""GGUF export of SmolLM2-135M: our exporter next to llama.cpp's own quantizer.

For every file type, two files are made from the same weights:

* **ours** — ``eq.export(model, path, ftype)``: our converter, ``choose_types`` and numpy
  encoders;
* **llama.cpp** — ``llama_model_quantize`` (llama-cpp-python 0.3.36, i.e. ``llama-quantize``)
  applied to our F32 export.

Both are measured the same way in llama.cpp (``eq.evaluate``): perplexity on the ``wiki``
corpus (BoolQ passages; ctx 512, first ``--max-tokens`` tokens), KL divergence and top-1
agreement against the F32 file, size and bits per weight. Then the same with an importance
matrix computed by ``eq`` on calibration windows from the *second* half of the corpus (never
the evaluated text), given to both quantizers. The tensors of each pair are also compared
byte for byte.

    python benchmarks/bench_gguf.py                 # writes benchmarks/results/gguf.{json,md}
    python benchmarks/bench_gguf.py --max-tokens 4096 --types Q4_K_M Q8_0

Caveat (shared/ENVIRONMENT.md): the zoo's SmolLM2 came out of a Q4_1 GGUF; the default zoo
entry is channel-permuted so that no format gets the grid for free.
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
TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]
NO_IMATRIX = {"F32", "F16", "BF16", "Q8_0"}  # llama.cpp's encoders ignore the imatrix here


def tensors_equal(a: Path, b: Path) -> bool:
    from edgequant.gguf.reader import inspect_gguf

    ia, ib = inspect_gguf(a), inspect_gguf(b)
    if {t.name: t.type for t in ia.tensors} != {t.name: t.type for t in ib.tensors}:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for ta in ia.tensors:
            tb = ib.tensor(ta.name)
            fa.seek(ia.data_offset + ta.offset)
            fb.seek(ib.data_offset + tb.offset)
            if fa.read(ta.nbytes) != fb.read(tb.nbytes):
                return False
    return True


def measure(path: Path, base: Path, args: argparse.Namespace) -> dict[str, Any]:
    import edgequant as eq

    t = time.perf_counter()
    res = eq.evaluate(str(path), ["ppl", "kld", "size"], kld_base=str(base), corpus=args.corpus,
                      ctx=args.ctx, max_tokens=args.max_tokens, threads=args.threads)
    return {"size_bytes": res.size_bytes, "bpw_linear": res.bits_per_weight,
            "bpw_total": res.bits_per_weight_total, "ppl": res.ppl, "kld_mean": res.kld_mean,
            "kld_p99": res.kld_p99, "top1": res.top1, "tokens_scored": res.tokens_scored,
            "eval_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--corpus", default="wiki")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-imatrix", action="store_true")
    ap.add_argument("--gptq", action="store_true",
                    help="add rows for our GPTQ error-feedback export (calibration data as "
                         "for the imatrix; no llama.cpp counterpart)")
    ap.add_argument("--gptq-only", action="store_true",
                    help="with --gptq: only the GPTQ rows (and F32), no ours/llama.cpp pairs")
    ap.add_argument("--measure-identical", action="store_true",
                    help="evaluate llama.cpp's file even when its tensors equal ours")
    ap.add_argument("--workdir", default=None, help="keep the GGUF files here")
    ap.add_argument("--out", default=str(ROOT / "results" / "gguf.json"))
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the .md table from an existing --out JSON and stop")
    args = ap.parse_args()
    if args.markdown_only:
        save(json.loads(Path(args.out).read_text()), Path(args.out))
        return

    import edgequant as eq
    from edgequant.data.calibration import calibration
    from edgequant.exporters.gguf import llama_cpp_quantize
    from edgequant.exporters.imatrix import collect

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"model": args.model, "corpus": args.corpus, "ctx": args.ctx,
                           "max_tokens": args.max_tokens, "threads": args.threads,
                           "cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                           "python": sys.version.split()[0], "rows": [], "timings": {}}
    t = time.perf_counter()
    model = eq.load(args.model)
    out["timings"]["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    f32 = eq.export(model, work / "F32.gguf", "F32", force=True)
    out["timings"]["export_F32_s"] = time.perf_counter() - t
    log(f"F32 export {out['timings']['export_F32_s']:.1f}s")
    out["rows"].append({"type": "F32", "imatrix": False, "who": "ours",
                        **measure(f32, f32, args)})
    if not args.gptq_only:
        t = time.perf_counter()
        src = eq.evaluate(model, ["ppl"], corpus=args.corpus, ctx=args.ctx,
                          max_tokens=args.max_tokens, threads=args.threads)
        out["source_transformers"] = {"ppl": src.ppl, "tokens_scored": src.tokens_scored,
                                      "eval_s": time.perf_counter() - t}
        log(f"F32 in llama.cpp ppl {out['rows'][0]['ppl']:.4f}, source in transformers "
            f"ppl {src.ppl:.4f}")

    imatrix = None
    if not args.no_imatrix:
        t = time.perf_counter()
        spec = calibration(args.corpus, args.calib_samples, args.calib_len, compute_dtype="float32")
        imatrix = collect(model, spec, hessians=args.gptq)
        out["timings"]["imatrix_s"] = time.perf_counter() - t
        out["imatrix"] = {"windows": args.calib_samples, "tokens_per_window": args.calib_len,
                          "corpus": args.corpus, "entries": len(imatrix),
                          "source": "second half of the corpus token stream"}
        imatrix.save(work / "imatrix.gguf")
        log(f"imatrix {out['timings']['imatrix_s']:.1f}s")

    for ftype in args.types:
        pairs = [False] if imatrix is None or ftype in NO_IMATRIX else [False, True]
        for use_im in ([] if args.gptq_only else pairs):
            tag = f"{ftype}{'-imat' if use_im else ''}"
            t = time.perf_counter()
            ours = eq.export(model, work / f"ours-{tag}.gguf", ftype, force=True,
                             imatrix=imatrix if use_im else None)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ref = llama_cpp_quantize(f32, work / f"llama-{tag}.gguf", ftype, force=True,
                                     imatrix=imatrix if use_im else None, threads=args.threads)
            t_ref = time.perf_counter() - t
            same = tensors_equal(ours, ref)
            measured: dict[str, Any] = {}
            for who, path, secs in (("ours", ours, t_ours), ("llama.cpp", ref, t_ref)):
                reuse = same and measured and not args.measure_identical
                row = {"type": ftype, "imatrix": use_im, "who": who, "quantize_s": secs,
                       "tensors_identical": same,
                       **(measured if reuse else measure(path, f32, args)),
                       "measured": "same tensors as ours, not re-run" if reuse else "yes"}
                measured = {k: row[k] for k in ("size_bytes", "bpw_linear", "bpw_total", "ppl",
                                                "kld_mean", "kld_p99", "top1", "tokens_scored")}
                if reuse:
                    row["size_bytes"] = path.stat().st_size
                out["rows"].append(row)
                log(f"{tag:12s} {who:9s} {secs:6.1f}s ppl {row['ppl']:.4f} "
                    f"kld {row['kld_mean']:.5f} identical={same}")
            save(out, Path(args.out))
        if args.gptq and imatrix is not None and ftype not in NO_IMATRIX:
            t = time.perf_counter()
            path = eq.export(model, work / f"ours-{ftype}-gptq.gguf", ftype, force=True,
                             imatrix=imatrix, gptq=True)
            row = {"type": ftype, "imatrix": True, "who": "ours+gptq",
                   "quantize_s": time.perf_counter() - t, **measure(path, f32, args)}
            out["rows"].append(row)
            log(f"{ftype}-gptq   ours+gptq {row['quantize_s']:6.1f}s ppl {row['ppl']:.4f} "
                f"kld {row['kld_mean']:.5f}")
            save(out, Path(args.out))
    q4 = [r for r in out["rows"] if r["type"] == "Q4_K_M" and r["who"] == "ours"
          and not r["imatrix"]]
    if q4:
        out["timings"]["export_Q4_K_M_s"] = q4[0]["quantize_s"]
    save(out, Path(args.out))


def log(msg: str) -> None:
    print(msg, flush=True)


def save(out: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(markdown(out))


def markdown(out: dict[str, Any]) -> str:
    t = out["timings"]
    lines = [
        f"# GGUF export: {out['model']}, ours vs llama.cpp's quantizer",
        "",
        f"Perplexity on `{out['corpus']}` (ctx {out['ctx']}, first {out['max_tokens']} tokens, "
        f"{_first(out, 'tokens_scored')} scored), KLD and top-1 against the F32 export, all "
        "run in llama.cpp (llama-cpp-python 0.3.36). `llama.cpp` = `llama_model_quantize` "
        "on our F32 file. bpw lin = bits per weight over the block linears; bpw all = every "
        "tensor. `same` = every tensor byte-identical between the two files; llama.cpp "
        "reads only the tensors and the model keys, so for identical tensors its metrics "
        "are not measured twice (marked `= ours`; `--measure-identical` re-runs them).",
        "",
        f"Times ({out['cpus']} CPUs, shared): load {t.get('load_s', 0):.1f} s, F32 export "
        f"{t.get('export_F32_s', 0):.1f} s, Q4_K_M export {t.get('export_Q4_K_M_s', 0):.1f} s"
        + (f", imatrix {t['imatrix_s']:.1f} s" if "imatrix_s" in t else "") + ".",
        "",
        *([f"The source model in transformers (fp32), same tokens: PPL "
           f"{out['source_transformers']['ppl']:.4f}.", ""] if "source_transformers" in out
          else []),
        "| type | imatrix | quantizer | size MB | bpw lin | bpw all | PPL | KLD | top-1 | "
        "same | quantize s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['who']} | "
            f"{r['size_bytes'] / 1e6:.1f} | {r['bpw_linear']:.3f} | {r['bpw_total']:.3f} | "
            f"{r['ppl']:.4f} | {r['kld_mean']:.5f} | {100 * r['top1']:.2f}% | "
            f"{_yes(r.get('tensors_identical'))}"
            f"{' (= ours)' if r.get('measured', 'yes') != 'yes' else ''} | "
            f"{_num(r.get('quantize_s'))} |")
    if "imatrix" in out:
        im = out["imatrix"]
        lines += ["", f"imatrix: {im['windows']} × {im['tokens_per_window']} tokens of "
                  f"`{im['corpus']}` ({im['source']}), {im['entries']} entries."]
    return "\n".join(lines) + "\n"


def _first(out: dict[str, Any], key: str) -> Any:
    return next((r[key] for r in out["rows"] if r.get(key) is not None), "?")


def _yes(v: Any) -> str:
    return "–" if v is None else ("yes" if v else "**no**")


def _num(v: Any) -> str:
    return "–" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()
