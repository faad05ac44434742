"""A fake, cheap matrix: makers and an evaluator that do no real work but go through the real
runner and store, and record every call in a log file (so a re-run in another process can be
checked for redone cells)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from edgequant.comparison import matrix
from edgequant.comparison.matrix import Cell, Settings
from edgequant.comparison.runner import CellContext, Evaluation, Made, result_metrics

MODEL = "fake-model"
SETTINGS = Settings(corpus="wiki", max_tokens=1024, ctx=256, generate_prompts=2)


def cells(model: str = MODEL) -> list[Cell]:
    return [matrix.baseline(model), matrix.native(model, "rtn", "w4g128"),
            matrix.native(model, "rtn", "w3g128"), matrix.native(model, "hqq", "w4g64-asym"),
            matrix.native(model, "gptq", "w4g128")]


def _bits(cell: Cell) -> float:
    if cell.kind == "baseline":
        return 32.0
    return float(cell.scheme[1]) + 0.125 + (0.25 if "g64" in cell.scheme else 0.0)


def fake_eval_dict(cell: Cell, model_scale: float = 1.0) -> dict:
    """An ``EvalResult.to_dict()``-shaped result whose numbers follow from the scheme."""
    bits = _bits(cell)
    err = 0.0 if cell.kind == "baseline" else 2.0 ** (-bits) * 4 * model_scale
    size = int(1e6 * (20 + 100 * model_scale * bits / 32))
    return {"ppl": 18.0 * model_scale * (1 + err), "nll_mean": math.log(18.0 * (1 + err)),
            "windows": 4, "tokens_scored": 1020, "kld_mean": err, "kld_median": err / 2,
            "kld_p99": err * 5, "kld_max": err * 9, "top1": 1 - err / 3, "ppl_base": 18.0,
            "prefill_tps": 500 / bits * 10, "decode_tps": 300 / bits, "threads": 2,
            "peak_rss_mb": 300 + size / 1e6, "rss_before_load_mb": 250.0,
            "size_bytes": size, "bits_per_weight": bits, "bits_per_weight_total": bits + 1,
            "num_params": 1_000_000,
            "tasks": {"arc_easy": {"acc": 0.6 - err / 10, "acc_norm": 0.55, "n": 20}},
            "timings": {"ppl": 0.01}}


def fake_layer_errors(cell: Cell) -> list[dict]:
    if cell.kind == "baseline":
        return []
    bits = _bits(cell)
    return [{"layer": f"model.layers.{b}.{role}", "block": b, "role": role.split(".")[-1],
             "rel_error": 2.0 ** (-bits) * (1 + 0.1 * b), "numel": 4096}
            for b in range(3) for role in ("self_attn.q_proj", "mlp.down_proj")]


class Log:
    """Append-only JSON-lines log of calls (survives a SIGKILL of the writer)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, what: str, cell: Cell) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"what": what, "label": cell.label, "model": cell.model}) + "\n")
            f.flush()

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]

    def count(self, what: str, label: str) -> int:
        return sum(1 for e in self.entries() if e["what"] == what and e["label"] == label)


def makers(log: Log, fail: set[str] = frozenset(), sleep: float = 0.0) -> dict:
    def make(ctx: CellContext) -> Made:
        log.add("make", ctx.cell)
        if ctx.cell.label in fail:
            raise RuntimeError(f"injected failure in the backend of {ctx.cell.label}")
        out = ctx.artifact_path
        out.mkdir(parents=True, exist_ok=True)
        (out / "weights.bin").write_bytes(b"x" * 16)
        return Made(str(out), None, 0.5, {"fake": True}, fake_layer_errors(ctx.cell))
    return {k: make for k in matrix.KINDS}


def evaluator(log: Log, sleep: float = 0.0, interrupt_at: str | None = None,
              no_speed_at: str | None = None):
    def evaluate(made: Made, ctx: CellContext) -> Evaluation:
        if ctx.cell.label == interrupt_at:
            raise KeyboardInterrupt
        log.add("evaluate", ctx.cell)
        res = fake_eval_dict(ctx.cell, 1.0 if ctx.cell.model == MODEL else 2.0)
        if sleep:
            time.sleep(sleep)
        gens = [{"prompt": f"prompt {i}", "output": f"{ctx.cell.label} says {i} | ok"}
                for i in range(ctx.settings.generate_prompts)]
        partial = []
        if ctx.cell.label == no_speed_at:
            for k in ("prefill_tps", "decode_tps", "peak_rss_mb"):
                res[k] = None
            partial.append(("evaluate:speed", TimeoutError("speed subprocess ran over 1800 s")))
        return Evaluation(res, result_metrics(res, bytes_scored=4000), {"fake": 0.01}, gens,
                          partial)
    return evaluate
