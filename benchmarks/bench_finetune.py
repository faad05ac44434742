"""Fine-tuning quantized SmolLM2-135M: how much of the quantization loss each method recovers.

Rows (issue 12's table): for each base — RTN ``w4g128`` and GPTQ ``w3g128`` — the quantized
base untouched, then QAT + KD, LR-QAT, LoRA (distillation) and PRILoRA, each trained on the
held-out half of ``wiki`` (see ``edgequant.finetuning.data``) for the same token budget; LoRA
rows are also merged into a float copy and re-quantized (``+merge``: GPTQ with calibration,
``--merge``; NF4 rows by RTN, as their base). ``rtn:chat-lora`` is LoRA with cross-entropy on
ShareGPT's assistant turns (its measure: the held-out response loss).
Then the peers at the same data, budget, objective and loop (``benchmarks/finetune_peers.py``):
``rtn64:torchao-qat`` (torchao's QAT from the fp32 model, int4 symmetric per group, measured
after convert; torchao needs the group to divide 576, so g64 where our main rows are g128 —
hence ``rtn64:base`` and ``rtn64:qat``, ours at RTN ``w4g64``, to compare at one group
size); and NF4 + double quant: ``nf4:base`` (ours,
``eq.quantize(model, "rtn", "nf4-dq")``), ``nf4:qlora`` (ours, ``eq.finetune(fp32, "qlora")``)
and ``nf4:peft-qlora`` (bitsandbytes NF4-dq + peft LoRA r16 on q/k/v/o).
Each row runs in a fresh Python process, so its peak RSS (``VmHWM``) is its own.

Measured per row with the project's yardstick (``eq.evaluate``, float32 on the exact
dequantized weights, LoRA adapters merged in float): perplexity, KL divergence and
top-1 agreement against the fp32 model on the first ``--max-eval-tokens`` tokens of ``wiki``
(ctx 512), and the mean response loss on the first ``--chat-eval`` held-out ShareGPT
conversations; plus training tokens, wall time, tokens/s and peak RSS. ``kld_recovery`` is
the fraction of the base's KLD the method removed: ``(KLD_base − KLD_row) / KLD_base``.

    python benchmarks/bench_finetune.py                    # every row, 61,440 tokens (30 steps)
    python benchmarks/bench_finetune.py --only rtn:qat,rtn:lora        # some rows
    python benchmarks/bench_finetune.py --max-steps 2 --seq-len 64 --out /tmp/ft.json  # smoke
    python benchmarks/bench_finetune.py --only rtn:qat --lr qat=2e-5                   # tune

Results: ``benchmarks/results/finetune.json`` and ``finetune.md``, rewritten after each row.
An existing ``--out`` is merged: rows not run this time are kept (each row records its own
budget and learning rate), rows run again are replaced, in the order of ``ROWS``.
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
BASES = {"rtn": ("rtn", "w4g128"), "gptq": ("gptq", "w3g128"), "nf4": ("rtn", "nf4-dq"),
         "rtn64": ("rtn", "w4g64")}
METHODS = ("base", "qat", "lr-qat", "lora", "prilora")
PEERS = ("torchao-qat", "peft-qlora")
ROWS = (tuple(f"{b}:{m}" for b in ("rtn", "gptq") for m in METHODS)
        + ("rtn:chat-lora", "rtn64:base", "rtn64:qat", "rtn64:torchao-qat", "nf4:base",
           "nf4:qlora", "nf4:peft-qlora"))

_CHILD = """\
import json, sys, time
import torch
import edgequant as eq
from edgequant.eval.memory import _peak_rss_mb
from edgequant.finetuning.data import DataConfig, chat_data
from edgequant.finetuning.objectives import cross_entropy
from edgequant.models.artifact import is_artifact
req = json.loads(sys.argv[1])

def response_loss(model, n, seq_len):
    data = chat_data(DataConfig("sharegpt", seq_len=seq_len, batch_size=1), model.tokenizer,
                     split="eval")
    total = count = 0
    with torch.no_grad():
        for i in range(n):
            b = data.batch(i)
            loss, k = cross_entropy(model.module(input_ids=b["input_ids"]).logits, b["labels"])
            total, count = total + float(loss) * k, count + k
    return total / max(count, 1)

def measure(model):
    # the yardstick's float32 path on the exact dequantized weights (adapters merged in float),
    # built once: the reference kernel would unpack every 3-bit weight on every forward
    from edgequant.finetuning.lora import merge_to_float
    from edgequant.models.model import Model
    model = Model(merge_to_float(model.module), model.tokenizer, dict(model.source))
    r = eq.evaluate(model, ["ppl", "kld"], kld_base=req["model"], ctx=512,
                    max_tokens=req["eval_tokens"]).to_dict()
    return {"ppl": r["ppl"], "kld": r["kld_mean"], "top1": r["top1"],
            "response_loss": response_loss(model, req["chat_eval"], 512)
            if req["chat_eval"] else None}

base_dir = req["work"] + "/base-" + req["base"]
if req["method"] in ("base", "qat", "lr-qat", "lora", "prilora", "chat-lora") and \\
        not is_artifact(base_dir):
    eq.quantize(req["model"], req["recipe"], req["scheme"]).save(base_dir, force=True)
t0 = time.perf_counter()
out = {"row": req["row"], "lr": req["lr"].get(req["method"]), "budget": req["budget"],
       "seq_len": req["seq_len"], "batch_size": req["batch_size"]}
if req["method"] == "base":
    out.update(measure(eq.load(base_dir)), train_tokens=0, lr=None)
elif req["method"] in ("torchao-qat", "peft-qlora"):
    sys.path.insert(0, req["bench_dir"])
    from finetune_peers import train_peer
    p = train_peer(req["method"], eq.load(req["model"]), req["work"] + "/" +
                   req["row"].replace(":", "-"), lr=req["lr"][req["method"]],
                   seq_len=req["seq_len"], batch_size=req["batch_size"],
                   save_every=req["save_every"], warmup_steps=req["warmup"],
                   max_steps=req["max_steps"] or None,
                   max_tokens=None if req["max_steps"] else req["max_tokens"])
    t = p.result
    out.update(train_tokens=t.tokens, train_s=t.seconds, tokens_per_s=t.tokens / t.seconds,
               peak_rss_train_mb=p.peak_rss_train_mb, notes=p.notes,
               trainable_params=p.trainable_params,
               optimizer_mb=p.trainable_params * 8 / 2**20)
    out.update(measure(p.model))
else:
    budget = {"max_steps": req["max_steps"]} if req["max_steps"] else \\
        {"max_tokens": req["max_tokens"]}
    chat = req["method"] == "chat-lora"
    method = "lora" if chat else req["method"]
    lora = method in ("lora", "qlora", "prilora")
    run_dir = req["work"] + "/" + req["row"].replace(":", "-")
    source = req["model"] if method == "qlora" else base_dir
    r = eq.finetune(source, method, "sharegpt" if chat else "wiki", run_dir,
                    objective="ce" if chat else "kd",
                    force=True, seq_len=req["seq_len"], batch_size=req["batch_size"],
                    lr=req["lr"][req["method"]],
                    merge=(req["recipe"] if req["base"] == "nf4" else req["merge"])
                    if lora else None, calib_samples=req["calib_samples"],
                    save_every=req["save_every"], warmup_steps=req["warmup"], **budget)
    t = r.summary["train"]
    n = r.summary["trainable"]["params"]
    out.update(train_tokens=t["tokens"], train_s=t["seconds"],
               tokens_per_s=t["tokens"] / t["seconds"], peak_rss_train_mb=_peak_rss_mb(),
               trainable_params=n, optimizer_mb=n * 8 / 2**20)
    out.update(measure(r.model))
    if lora:
        merged = measure(eq.load(r.out / "model"))
        out["merged"] = {**merged, "codes_changed": r.summary["merge"]["codes_changed"]}
out["wall_s"] = time.perf_counter() - t0
out["peak_rss_mb"] = _peak_rss_mb()
print("RESULT " + json.dumps(out))
"""

# eq.finetune's defaults (finetuning.api.DEFAULT_LR); the peers take their counterparts'
LR = {"qat": 3e-4, "lr-qat": 1e-2, "lora": 1e-3, "prilora": 1e-3, "chat-lora": 1e-3,
      "torchao-qat": 3e-4, "qlora": 1e-3, "peft-qlora": 1e-3}
# a peer (or qlora) takes its counterpart's overridden LR unless given its own: same LR, fair
LR_FOLLOWS = {"torchao-qat": "qat", "qlora": "lora", "peft-qlora": "qlora", "chat-lora": "lora"}


def learning_rates(spec: str) -> dict[str, float]:
    """``LR`` with ``--lr`` overrides (``qat=2e-5,lora=1e-4``) applied.

    Raises:
        ValueError: a malformed item, an unknown method or a non-positive rate.
    """
    given: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, sep, val = item.partition("=")
        if not sep or key.strip() not in LR:
            raise ValueError(f"--lr item {item!r}: expected METHOD=RATE with METHOD one of "
                             f"{', '.join(LR)}")
        given[key.strip()] = float(val)
        if given[key.strip()] <= 0:
            raise ValueError(f"--lr item {item!r}: the rate must be > 0")
    lr = {**LR, **given}
    for peer, partner in LR_FOLLOWS.items():  # in order: qlora before peft-qlora
        if peer not in given and lr[partner] != LR[partner]:
            lr[peer] = lr[partner]
    return lr


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    base, method = row.split(":")
    recipe, scheme = BASES[base]
    req = {"row": row, "base": base, "method": method, "recipe": recipe, "scheme": scheme,
           "model": args.model, "work": str(args.work), "max_steps": args.max_steps,
           "max_tokens": args.max_tokens, "seq_len": args.seq_len,
           "batch_size": args.batch_size, "lr": args.lrs, "eval_tokens": args.max_eval_tokens,
           "chat_eval": args.chat_eval, "save_every": args.save_every,
           "budget": budget_text(args), "bench_dir": str(ROOT), "merge": args.merge,
           "warmup": args.warmup, "calib_samples": args.calib_samples}
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent / "src")}
    load_start = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(req)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "load_avg_1m": [load_start, os.getloadavg()[0]]}
    return {"row": row, "error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}


def add_recovery(rows: list[dict[str, Any]]) -> None:
    base_kld = {r["row"].split(":")[0]: r.get("kld") for r in rows if r["row"].endswith(":base")}
    for r in rows:
        b = base_kld.get(r["row"].split(":")[0])
        for part in (r, r.get("merged") or {}):
            if b and part.get("kld") is not None:
                part["kld_recovery"] = (b - part["kld"]) / b


def budget_text(args: argparse.Namespace) -> str:
    return f"{args.max_steps} steps" if args.max_steps else f"{args.max_tokens:,} tokens"


def merged_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows with ``new`` ones replacing the same row names, in the order of ``ROWS``
    (rows ``ROWS`` does not know last, in their old order)."""
    by_name = {r["row"]: r for r in old}
    by_name.update({r["row"]: r for r in new})
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(by_name.values(), key=lambda r: order.get(r["row"], len(ROWS)))


def read_old(out: Path) -> list[dict[str, Any]]:
    """The rows already in ``out`` (none if it is missing or unreadable)."""
    try:
        return list(json.loads(out.read_text()).get("rows", []))
    except (OSError, ValueError, AttributeError):
        return []


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    os.replace(tmp, out)
    head = ("| row | PPL | KLD | top-1 | response loss | KLD recovery | train tokens | "
            "tokens/s | wall s | peak RSS MB | optimizer MB | codes changed |")
    budgets = sorted({r["budget"] for r in rows if r.get("budget")}) or [meta["budget"]]
    lines = [f"# Fine-tuning SmolLM2-135M ({', '.join(budgets)})", "", head,
             "|" + " --- |" * 12]

    def fmt(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['row']} | error: {' / '.join(r['error'])} |" + " |" * 10)
            continue
        for name, p in ((r["row"], r), (r["row"] + "+merge", r.get("merged"))):
            if p is None:
                continue
            lines.append(f"| {name} | {fmt(p.get('ppl'), '.3f')} | {fmt(p.get('kld'), '.4f')} "
                         f"| {fmt(p.get('top1'), '.4f')} | {fmt(p.get('response_loss'), '.4f')} "
                         f"| {fmt(p.get('kld_recovery'), '.1%')} | "
                         f"{fmt(r.get('train_tokens'), ',')} | "
                         f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('wall_s'), '.0f')} "
                         f"| {fmt(r.get('peak_rss_mb'), ',.0f')} "
                         f"| {fmt(r.get('optimizer_mb'), ',.1f')} "
                         f"| {fmt(p.get('codes_changed'), '.2%')} |")
    notes = [f"- {r['row']}: {r['notes']}" for r in rows if r.get("notes")]
    lrs = [f"{r['row']} {r['lr']:g}" for r in rows if r.get("lr")]
    lines += ["", "Learning rates: " + ", ".join(lrs) + "."] if lrs else []
    lines += ["", *notes] if notes else []
    tmp_md = out.with_suffix(".md.tmp")
    tmp_md.write_text("\n".join(lines) + "\n")
    os.replace(tmp_md, out.with_suffix(".md"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", default="", help="comma-separated rows (default: all): "
                    + ", ".join(ROWS))
    ap.add_argument("--max-tokens", type=int, default=61_440, help="training tokens per row "
                    "(30 steps of 4 × 512)")
    ap.add_argument("--max-steps", type=int, default=0, help="instead of --max-tokens")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (every row)")
    ap.add_argument("--max-eval-tokens", type=int, default=8192)
    ap.add_argument("--chat-eval", type=int, default=64, help="held-out ShareGPT "
                    "conversations for the response loss (0: skip)")
    ap.add_argument("--lr", default="", help="learning-rate overrides, e.g. "
                    "qat=2e-5,lora=1e-4 (defaults: " + ", ".join(f"{k}={v:g}"
                                                                 for k, v in LR.items())
                    + "); torchao-qat follows qat, qlora follows lora and peft-qlora "
                    "follows qlora unless given")
    ap.add_argument("--merge", default="gptq", help="the recipe LoRA rows are re-quantized "
                    "with after merging (GPTQ with calibration, the default of eq.finetune)")
    ap.add_argument("--calib-samples", type=int, default=32, help="the merge's GPTQ "
                    "calibration windows (of 512 tokens)")
    ap.add_argument("--work", type=Path, default=Path("out/bench-finetune"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "finetune.json")
    args = ap.parse_args()
    rows_to_run = [r for r in args.only.split(",") if r] or list(ROWS)
    unknown = set(rows_to_run) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; valid: {', '.join(ROWS)}")
    try:
        args.lrs = learning_rates(args.lr)
    except ValueError as e:
        ap.error(str(e))
    sys.path.insert(0, str(ROOT.parent / "src"))
    from edgequant.comparison.runner import cpu_model

    meta = {"model": args.model, "machine": cpu_model() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(),
            "budget": budget_text(args), "seq_len": args.seq_len,
            "batch_size": args.batch_size, "warmup": args.warmup, "lr": args.lrs,
            "started": time.strftime("%F %T")}
    old = read_old(args.out)
    if old:
        print(f"merging into {args.out}: keeping {len(old)} existing rows not run again",
              file=sys.stderr)
    done: list[dict[str, Any]] = []
    for row in rows_to_run:
        done.append(run_row(row, args))
        rows = merged_rows(old, done)
        add_recovery(rows)
        meta["load_avg_end"] = os.getloadavg()
        print(json.dumps(done[-1]), flush=True)
        write(rows, meta, args.out)


if __name__ == "__main__":
    main()
