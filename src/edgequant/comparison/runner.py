"""Run a matrix of cells: make each artifact, evaluate it, store everything; resume after a stop.

For each cell, in order (cells of one model together, its fp baseline first):

1. **skip** it when a result for its hash is already in ``results.db`` (a finished cell is
   never redone; ``force=True`` redoes it);
2. **make** its artifact under ``DIR/artifacts/<model>/`` — or reuse the artifact a stopped
   run already made and recorded — and, for our own quantized artifacts, compute the
   per-layer weight error against the source (committed with the artifact row);
3. **evaluate** it with ``eq.evaluate`` under the run's :class:`~.matrix.Settings` (the same
   windows, KLD against the same fp baseline, the speed test in a fresh process) plus a few
   greedy generations;
4. **commit** its result, metrics, timings and generations in one transaction.

A cell that raises is recorded in ``errors`` (step, type, message, traceback) and the run goes
on with the next one. Ctrl-C (``KeyboardInterrupt``) marks the run ``interrupted`` and stops;
anything committed stays, so the next run resumes where this one stopped.

Makers and the evaluator are plain functions looked up in :data:`MAKERS` (one per cell kind)
and passed in, so tests can inject fakes and failing backends.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgequantError
from ..versions import installed_versions
from .matrix import Cell, Settings, cell_config, cell_hash, eval_hash
from .store import Store, now

_VERSIONED = ("numpy", "gguf", "safetensors", "llama_cpp_python", "bitsandbytes", "hqq",
              "llmcompressor", "gptqmodel", "optimum-quanto", "torchao", "matplotlib")


@dataclass
class Made:
    """A made artifact: what ``eq.open`` takes, and what the maker measured."""

    path: str
    backend: str | None = None
    make_s: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    layer_errors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Evaluation:
    """What a cell's evaluation gives the store."""

    result: dict[str, Any]
    metrics: dict[str, float | None]
    timings: dict[str, float] = field(default_factory=dict)
    generations: list[dict[str, Any]] = field(default_factory=list)
    #: measurements that failed while the rest succeeded: (step, exception)
    partial: list[tuple[str, BaseException]] = field(default_factory=list)


class Hooks:
    """Progress callbacks (all optional; the default shows nothing)."""

    def run_started(self, total: int, todo: int, out_dir: Path) -> None: ...

    def cell_started(self, index: int, total: int, cell: Cell, short: str) -> None: ...

    def step(self, name: str) -> None: ...

    def cell_finished(self, cell: Cell, status: str, seconds: float, message: str = "") -> None:
        ...

    def track(self, items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
        return items

    def run_finished(self, summary: RunSummary) -> None: ...


@dataclass
class RunSummary:
    run_id: int
    out_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    status: str = "running"
    seconds: float = 0.0


class CellContext:
    """What a maker or the evaluator may use: the cell, settings, paths, the loaded source."""

    def __init__(self, runner: Runner, cell: Cell, hash_: str) -> None:
        self.runner, self.cell, self.hash = runner, cell, hash_
        self.settings = runner.settings
        self.track = runner.hooks.track

    @property
    def artifact_path(self) -> Path:
        """Where this cell's artifact goes (``.gguf`` files get the suffix)."""
        ext = ".gguf" if self.cell.kind == "gguf" else ""
        return (self.runner.out_dir / "artifacts" / slug(self.cell.model)
                / f"{slug(self.cell.label)}-{self.hash[:8]}{ext}")

    def source_path(self) -> str:
        return self.runner.sources.path(self.cell.model)

    def source_model(self) -> Any:
        return self.runner.sources.model(self.cell.model)

    @property
    def kld_base(self) -> Any:
        """The fp baseline every KLD of this model is measured against: the source model
        already in memory (a Runnable), so no cell loads it again."""
        return self.runner.sources.base_runnable(self.cell.model)

    def bytes_scored(self, runnable: Any) -> int:
        return self.runner.sources.bytes_scored(self.cell.model, self.settings, runnable)


Maker = Callable[[CellContext], Made]
Evaluator = Callable[[Made, CellContext], Evaluation]


class Runner:
    """Runs cells into a store. See :func:`run`."""

    def __init__(self, out_dir: str | Path, settings: Settings, *, hooks: Hooks | None = None,
                 makers: dict[str, Maker] | None = None, evaluator: Evaluator | None = None,
                 force: bool = False, sources: Sources | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.settings = settings
        self.hooks = hooks or Hooks()
        self.makers = {**MAKERS, **(makers or {})}
        self.evaluator = evaluator or evaluate_cell
        self.force = force
        self.sources = sources or Sources()

    def run(self, cells: Sequence[Cell], preset: str | None = None,
            argv: list[str] | None = None) -> RunSummary:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with dir_lock(self.out_dir), Store(self.out_dir) as store:
            run_id = store.start_run(preset, argv, host_info(), versions(),
                                     self.settings.to_dict())
            summary = RunSummary(run_id, self.out_dir)
            try:
                hashes = self._register(store, cells)
                todo = [c for c, h in zip(cells, hashes, strict=True)
                        if self.force or not store.is_done(h)]
                self.hooks.run_started(len(cells), len(todo), self.out_dir)
                for i, (cell, h) in enumerate(zip(cells, hashes, strict=True)):
                    if not self.force and store.is_done(h):
                        summary.skipped.append(h)
                        self.hooks.cell_finished(cell, "skipped", 0.0, "already done")
                        continue
                    self.hooks.cell_started(i, len(cells), cell, h[:8])
                    ok = self._cell(store, run_id, cell, h)
                    (summary.done if ok else summary.failed).append(h)
                summary.status = "done"
            except KeyboardInterrupt:
                summary.status = "interrupted"
                raise
            except BaseException:
                summary.status = "failed"
                raise
            finally:
                summary.seconds = time.perf_counter() - t0
                store.finish_run(run_id, summary.status)
                self.sources.clear()
        self.hooks.run_finished(summary)
        return summary

    def _register(self, store: Store, cells: Sequence[Cell]) -> list[str]:
        eh = eval_hash(self.settings)
        hashes = []
        for cell in cells:
            fp = self.sources.fingerprint(cell.model)
            h = cell_hash(cell, self.settings, fp)
            store.upsert_cell(h, cell.to_dict(), cell.label, eh,
                              cell_config(cell, self.settings, fp))
            hashes.append(h)
        return hashes

    def _cell(self, store: Store, run_id: int, cell: Cell, h: str) -> bool:
        ctx = CellContext(self, cell, h)
        started, t0 = now(), time.perf_counter()
        step = "make"
        try:
            self.hooks.step("make")
            made, artifact_id = self._made(store, run_id, ctx)
            step = "evaluate"
            self.hooks.step("evaluate")
            t1 = time.perf_counter()
            ev = self.evaluator(made, ctx)
            eval_s = time.perf_counter() - t1
            step = "store"
            metrics = {**ev.metrics, "make_s": made.make_s, "eval_s": eval_s}
            timings = {"make": made.make_s or 0.0, "evaluate": eval_s, **ev.timings}
            store.record_result(h, run_id, artifact_id, started, ev.result, metrics, timings,
                                ev.generations, ev.partial)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one failing cell never stops the run
            store.record_error(h, run_id, step, e)
            self.hooks.cell_finished(cell, "failed", time.perf_counter() - t0,
                                     f"{step}: {type(e).__name__}: {first_line(e)}")
            return False
        note = "; ".join(f"{st} failed: {type(e).__name__}: {first_line(e)}"
                         for st, e in ev.partial)
        self.hooks.cell_finished(cell, "done", time.perf_counter() - t0, note)
        return True

    def _made(self, store: Store, run_id: int, ctx: CellContext) -> tuple[Made, int]:
        prev = None if self.force else store.latest_artifact(ctx.hash)
        if prev is not None and Path(prev["path"]).exists():
            info = prev["info"] or {}
            return Made(prev["path"], info.get("backend"), prev["make_s"], info), int(prev["id"])
        maker = self.makers.get(ctx.cell.kind)
        if maker is None:
            raise KeyError(f"no maker for cell kind {ctx.cell.kind!r}")
        t0 = time.perf_counter()
        made = maker(ctx)
        if made.make_s is None:
            made.make_s = time.perf_counter() - t0
        info = {**made.info, "backend": made.backend}
        aid = store.record_artifact(ctx.hash, run_id, made.path, made.make_s, info,
                                    made.layer_errors)
        return made, aid


def run(cells: Sequence[Cell], out_dir: str | Path, settings: Settings | None = None, *,
        hooks: Hooks | None = None, makers: dict[str, Maker] | None = None,
        evaluator: Evaluator | None = None, force: bool = False, preset: str | None = None,
        argv: list[str] | None = None) -> RunSummary:
    """Run ``cells`` into ``out_dir/results.db`` (resuming; see the module docstring)."""
    return Runner(out_dir, settings or Settings(), hooks=hooks, makers=makers,
                  evaluator=evaluator, force=force).run(cells, preset, argv)


@contextlib.contextmanager
def dir_lock(out_dir: Path) -> Iterator[None]:
    """One compare per directory at a time (an exclusive ``flock`` on ``DIR/.compare.lock``,
    released by the kernel when the process dies, however it dies)."""
    import fcntl

    f = open(out_dir / ".compare.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompareBusyError(f"another edgequant compare is running in {out_dir}; wait "
                                   "for it or use another -o directory") from None
        yield
    finally:
        f.close()


class CompareBusyError(EdgequantError):
    """Another compare holds the output directory."""


# --- sources ------------------------------------------------------------------------------------


class Sources:
    """Each model's local path, fingerprint and loaded weights, resolved once per run (one
    model is kept in memory at a time: cells of a model run together)."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}
        self._fps: dict[str, str] = {}
        self._bytes: dict[tuple[str, str], int] = {}
        self._model: tuple[str, Any] | None = None

    def fingerprint(self, model: str) -> str:
        if model not in self._fps:
            self._fps[model] = source_fingerprint(model)
        return self._fps[model]

    def path(self, model: str) -> str:
        """A local path ``eq.open`` and the peers take (a zoo model is pulled once)."""
        if model not in self._paths:
            from ..models import zoo

            p = Path(model).expanduser()
            if model in zoo.ZOO:
                self._paths[model] = str(zoo.pull(model))
            else:
                self._paths[model] = str(p.resolve()) if p.exists() else model
        return self._paths[model]

    def model(self, model: str) -> Any:
        if self._model is None or self._model[0] != model:
            from .. import load

            self._model = None
            self._model = (model, load(self.path(model)))
        return self._model[1]

    def base_runnable(self, model: str) -> Any:
        """The loaded source as a torch Runnable (opened from its path, so its identity — and
        the KLD cache key — is the same as ``eq.open(path)``'s)."""
        from ..backends.torch_native import TorchRunnable

        return TorchRunnable(self.model(model), reopen=self.path(model))

    def bytes_scored(self, model: str, settings: Settings, runnable: Any) -> int:
        """UTF-8 bytes of the text whose tokens perplexity scores (for bits per byte), counted
        once per model with its source tokenizer so every cell of the model shares it."""
        key = (model, f"{settings.corpus}:{settings.ctx}:{settings.max_tokens}")
        if key not in self._bytes:
            self._bytes[key] = scored_bytes(_source_tokenizer(self.path(model)) or runnable,
                                            settings)
        return self._bytes[key]

    def clear(self) -> None:
        self._model = None


class _SourceTokenizer:
    """The source folder's transformers tokenizer: plain-text ids (as evaluation tokenizes),
    its BOS, and decoding."""

    def __init__(self, tok: Any) -> None:
        from ..data.tokens import HFTextTokenizer

        self.tok = tok
        self.text = HFTextTokenizer(tok)
        self.bos_id = self.text.bos_id

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.text.tokenize(text, special)

    def tokenizer_fingerprint(self) -> str:
        return self.text.tokenizer_fingerprint()

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=False))


def _source_tokenizer(path: str) -> _SourceTokenizer | None:
    p = Path(path)
    if not p.is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        tok = _SourceTokenizer(AutoTokenizer.from_pretrained(str(p)))
    except Exception:  # noqa: BLE001 - fall back to the cell's own runnable
        return None
    return tok if tok.bos_id is not None else None


def scored_bytes(tok: Any, settings: Settings) -> int:
    """Bytes of the detokenized target tokens of every perplexity window (``tok``: anything
    with ``tokenize``, ``tokenizer_fingerprint``, ``bos_id`` and ``detokenize``)."""
    from ..data.tokens import corpus_tokens
    from ..eval.perplexity import make_windows

    stream = corpus_tokens(settings.corpus, tok)
    w = make_windows(stream, settings.ctx, int(tok.bos_id), settings.max_tokens, False)
    return sum(len(tok.detokenize(w.targets(i).tolist()).encode("utf-8")) for i in range(w.n))


def source_fingerprint(model: str) -> str:
    """What identifies the source's weights without loading them."""
    from ..models import zoo

    if model in zoo.ZOO:
        e = zoo.ZOO[model]
        return f"zoo:{model}:{e.gguf_sha256}:permute={e.permute}:seed={e.seed}"
    p = Path(model).expanduser()
    if p.is_file():
        from ..io_utils import sha256_file

        return f"file:{sha256_file(p)}"
    if p.is_dir():
        from ..models.sources import weights_sha256

        try:
            return f"dir:{weights_sha256(p)}"
        except Exception:  # noqa: BLE001 - an artifact or peer folder: its manifest names it
            return f"path:{p.resolve()}"
    return f"id:{model}"


# --- the makers ---------------------------------------------------------------------------------


def make_baseline(ctx: CellContext) -> Made:
    path = ctx.source_path()
    backend = "torch" if path.lower().endswith(".gguf") else None
    return Made(path, backend, 0.0, {"note": "the source model itself, fp32"})


def make_native(ctx: CellContext) -> Made:
    from .. import quantize
    from .layer_error import native_errors

    cell, out = ctx.cell, ctx.artifact_path
    model = ctx.source_model()
    recipe = cell.recipe()
    calib = ctx.settings.calibration() if recipe.needs_calibration else None
    t0 = time.perf_counter()
    q = quantize(model, recipe, calib=calib, inplace=False, progress=ctx.track)
    q.save(out, force=True)
    make_s = time.perf_counter() - t0
    del q
    errors = native_errors(model.module, out, rescaled=bool(recipe.transforms))
    return Made(str(out), None, make_s, {"calibration": ctx.settings.calib_dict()
                                         if calib is not None else None}, errors)


def make_gguf(ctx: CellContext) -> Made:
    from ..exporters.gguf import export
    from .layer_error import gguf_errors

    out = ctx.artifact_path
    model = ctx.source_model()
    t0 = time.perf_counter()
    options = dict(ctx.cell.options)
    export(model, out, ctx.cell.scheme, force=True, progress=ctx.track, **options)
    make_s = time.perf_counter() - t0
    return Made(str(out), None, make_s, {},
                gguf_errors(model, out, options.get("tokenizer_pre")))


def make_peer(ctx: CellContext) -> Made:
    from ..backends import peers

    p = peers.get(ctx.cell.method)
    calib = ctx.settings.calibration() if p.calibrated else None
    t0 = time.perf_counter()
    out = p.make(ctx.source_path(), ctx.artifact_path, calib=calib, force=True)
    return Made(str(out), None, time.perf_counter() - t0,
                {"calibration": ctx.settings.calib_dict() if calib is not None else None})


MAKERS: dict[str, Maker] = {"baseline": make_baseline, "native": make_native, "gguf": make_gguf,
                            "peer": make_peer}


# --- the evaluator ------------------------------------------------------------------------------

SPEED_KEYS = ("prefill_tps", "decode_tps", "threads", "speed", "peak_rss_mb",
              "rss_before_load_mb", "peak_cuda_mb")
SCALARS = ("ppl", "nll_mean", "windows", "tokens_scored", "kld_mean", "kld_median", "kld_p99",
           "kld_max", "top1", "ppl_base", "prefill_tps", "decode_tps", "threads", "peak_rss_mb",
           "rss_before_load_mb", "size_bytes", "bits_per_weight", "bits_per_weight_total",
           "num_params")


def evaluate_cell(made: Made, ctx: CellContext) -> Evaluation:
    """``eq.evaluate`` of the artifact with the run's settings, plus greedy generations."""
    from ..backends.base import engine_of, open_runnable
    from ..eval.evaluate import EvalConfig, evaluate
    from ..eval.generate import PROMPTS, generate_samples

    s = ctx.settings
    cfg = EvalConfig(corpus=s.corpus, ctx=s.ctx, max_tokens=s.max_tokens, kld_base=ctx.kld_base,
                     kld_topk=s.kld_topk, tasks=s.tasks, limit=s.limit, seed=s.task_seed,
                     prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens,
                     speed_runs=s.speed_runs, warmup=s.warmup, threads=s.threads,
                     generate_tokens=s.generate_tokens, backend=made.backend)
    metrics = ["ppl", "kld", "size"] + (["tasks"] if s.tasks else [])
    opts = {"threads": s.threads} if s.threads is not None else {}
    partial: list[tuple[str, BaseException]] = []
    gens: list[dict[str, Any]] = []
    gen_s = 0.0
    with open_runnable(made.path, backend=made.backend, **opts) as r:
        res = evaluate(r, metrics, cfg, progress=ctx.track).to_dict()
        nbytes = ctx.bytes_scored(r)
        # speed/memory and generations are measured apart: when one of them fails (a speed
        # subprocess over its time limit on a slow machine), the quality figures still count
        # and the failure is recorded as this cell's incomplete measurement
        try:
            sp = evaluate(r, ["speed", "memory"], cfg).to_dict()
            res.update({k: sp.get(k) for k in SPEED_KEYS})
            res["metrics"] = [*res["metrics"], "speed", "memory"]
            res["timings"] = {**res.get("timings", {}), **sp.get("timings", {})}
            res["notes"] = [*res.get("notes", []), *sp.get("notes", [])]
        except Exception as e:  # noqa: BLE001 - recorded with the result
            partial.append(("evaluate:speed", e))
        if s.generate_prompts > 0:
            t0 = time.perf_counter()
            try:
                with getattr(r, "weights_cached", contextlib.nullcontext)():  # quality, not speed
                    gens = generate_samples(engine_of(r), PROMPTS[:s.generate_prompts],
                                            s.generate_tokens)
            except Exception as e:  # noqa: BLE001 - recorded with the result
                partial.append(("evaluate:generate", e))
            gen_s = time.perf_counter() - t0
    res["generations"] = gens
    timings = {f"eval:{k}": v for k, v in res.get("timings", {}).items()}
    timings["generate"] = gen_s
    return Evaluation(res, result_metrics(res, nbytes), timings,
                      [{"prompt": g["prompt"], "output": g["output"]} for g in gens], partial)


def result_metrics(res: dict[str, Any], bytes_scored: int | None = None
                   ) -> dict[str, float | None]:
    """One number per metric row: the scalars of an ``EvalResult`` dict, per-task accuracies,
    and the derived ``size_mb``, ``task_acc`` (mean acc over tasks) and ``bpb``."""
    out: dict[str, float | None] = {k: _num(res.get(k)) for k in SCALARS}
    accs = []
    for name, t in sorted((res.get("tasks") or {}).items()):
        for k in ("acc", "acc_norm", "n"):
            if t.get(k) is not None:
                out[f"task:{name}:{k}"] = float(t[k])
        if t.get("acc") is not None:
            accs.append(float(t["acc"]))
    out["task_acc"] = sum(accs) / len(accs) if accs else None
    size = out.get("size_bytes")
    out["size_mb"] = size / 1e6 if size is not None else None
    nll, n = out.get("nll_mean"), out.get("tokens_scored")
    if bytes_scored and nll is not None and n:
        out["bytes_scored"] = float(bytes_scored)
        out["bpb"] = nll * n / math.log(2) / bytes_scored
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# --- small helpers ------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text).name if os.sep in text else text
                  ).strip("-") or "x"


def first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return lines[0][:300] if lines else type(e).__name__


def host_info() -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 0
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        load = None
    return {"hostname": platform.node(), "platform": platform.platform(),
            "machine": platform.machine(), "processor": platform.processor(),
            "python": sys.version.split()[0], "cpus": cpus, "cpu_model": cpu_model(),
            "mem_gb": _mem_gb(), "loadavg": load}


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict[str, str]:
    """The installed versions of every library a compare's numbers may depend on."""
    return installed_versions(*_VERSIONED)
