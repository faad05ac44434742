"""``evaluate``: every measurement of one model, through the Runnable interface only.

    res = eq.evaluate("out/smollm2-rtn", ["ppl", "kld", "tasks", "speed", "memory", "size"],
                      kld_base="smollm2-135m", tasks=("hellaswag", "arc_easy"), limit=200)
    res.to_dict()["kld_mean"]

Metrics: ``ppl`` (and ``kld`` against ``kld_base`` in the same pass over the same windows),
``tasks``, ``speed`` and ``memory`` (one fresh subprocess gives both), ``size``,
``generate``. Without ``metrics``: ppl, speed, memory, size — plus kld when a ``kld_base`` is
given and tasks when ``tasks`` are.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Runnable, engine_of, open_runnable
from ..compute import resolve_compute_dtype
from ..errors import EvaluationError
from ..progress import Progress
from ..versions import installed_versions

METRICS = ("ppl", "kld", "tasks", "speed", "memory", "size", "generate")


@dataclass(frozen=True)
class EvalConfig:
    """Every evaluation option, in one place.

    Attributes:
        corpus: ``wiki`` | ``lambada`` | ``shakespeare`` | a UTF-8 text file.
        ctx: window length (tokens, BOS included).
        max_tokens: use at most this many stream tokens (``max_tokens // ctx`` windows).
        ppl_half: score only the second half of each window (llama.cpp's convention).
        kld_base: the base model (any source ``eq.open`` takes, or a Runnable).
        kld_topk: base head tokens cached per position (see :mod:`edgequant.eval.kld`).
        kld_tail: base tail-quantile tokens cached per position.
        tasks: task names (see :func:`edgequant.data.task_names`).
        limit: items per task, a seeded fixed subset (None: all).
        seed: for the task subset.
        prompt_tokens, new_tokens, speed_runs, warmup: the speed protocol.
        speed_timeout: seconds the speed/memory subprocess may run.
        speed_dtype: the dtype a torch model is reopened in for speed and memory
            (``auto``: bfloat16 where the CPU multiplies it natively — what a deployment
            would use, with 4-bit layers on the fused int4 kernel — else float32;
            ``float32``; ``bfloat16``). Accuracy metrics always compute in the dtype the
            model was opened in (float32 by default).
        threads: CPU threads (None: the backend's default; recorded either way).
        generate_tokens: new tokens per generation prompt.
        generate_out: JSON file for the generations (None: kept in the result only).
        backend: force a backend when opening a path (e.g. ``torch`` for a ``.gguf``).
    """

    corpus: str = "wiki"
    ctx: int = 512
    max_tokens: int | None = 8192
    ppl_half: bool = False
    kld_base: Any = None
    kld_topk: int = 256
    kld_tail: int = 128
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    seed: int = 1234
    prompt_tokens: int = 512
    new_tokens: int = 128
    speed_runs: int = 3
    warmup: int = 1
    speed_timeout: float = 3600.0
    speed_dtype: str = "auto"
    threads: int | None = None
    generate_tokens: int = 64
    generate_out: str | None = None
    backend: str | None = None


@dataclass
class EvalResult:
    """All figures of one evaluation; ``None`` where a metric was not measured."""

    model: dict[str, Any]
    backend: str
    metrics: list[str]
    corpus: str | None = None
    ctx: int | None = None
    ppl_half: bool | None = None
    windows: int | None = None
    tokens_scored: int | None = None
    ppl: float | None = None
    nll_mean: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1: float | None = None
    ppl_base: float | None = None
    kld_base: dict[str, Any] | None = None
    kld_base_cached: bool | None = None
    kld_topk: int | None = None
    kld_tail: int | None = None
    prefill_tps: float | None = None
    decode_tps: float | None = None
    threads: int | None = None
    speed: dict[str, Any] | None = None
    peak_rss_mb: float | None = None
    rss_before_load_mb: float | None = None
    peak_cuda_mb: float | None = None
    size_bytes: int | None = None
    size_on_disk: bool | None = None
    bits_per_weight: float | None = None
    bits_per_weight_total: float | None = None
    num_params: int | None = None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    generations: list[dict[str, Any]] | None = None
    generations_file: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resolve_metrics(metrics: Sequence[str] | None, cfg: EvalConfig) -> list[str]:
    """The metrics to run, in canonical order; the default set when ``metrics`` is None."""
    if metrics is None:
        wanted = {"ppl", "speed", "memory", "size"}
        wanted |= {"kld"} if cfg.kld_base is not None else set()
        wanted |= {"tasks"} if cfg.tasks else set()
    else:
        wanted = {m.strip().lower() for m in metrics}
        unknown = wanted - set(METRICS)
        if unknown:
            raise EvaluationError(f"unknown metric(s) {', '.join(sorted(unknown))}; known: "
                                  f"{', '.join(METRICS)}")
    if "kld" in wanted and cfg.kld_base is None:
        raise EvaluationError("kld needs a base model: pass kld_base=SOURCE (--kld-base)")
    if "tasks" in wanted and not cfg.tasks:
        raise EvaluationError("tasks needs task names, e.g. tasks=('hellaswag', 'arc_easy')")
    return [m for m in METRICS if m in wanted]


def evaluate(target: Any, metrics: Sequence[str] | None = None,
             config: EvalConfig | None = None, *, progress: Progress | None = None,
             **options: Any) -> EvalResult:
    """Measure ``target`` (a Runnable, a ``Model``, or a path/zoo name ``eq.open`` takes).

    Args:
        metrics: names from ``METRICS``; None for the default set (module docstring).
        config: options; ``options`` override single fields (``ctx=1024``).
        progress: ``progress(iterable, total, description)`` wrapping long loops.

    Raises:
        EvaluationError, DataError, ModelLoadError: with a message saying what to change.
    """
    cfg = _config(config, options)
    wanted = resolve_metrics(metrics, cfg)
    if "tasks" in wanted:
        from ..data.tasks import task_names

        unknown = [t for t in cfg.tasks if t not in task_names()]
        if unknown:
            from ..errors import DataError

            raise DataError(f"unknown task(s) {', '.join(unknown)}; known tasks: "
                            f"{', '.join(task_names())}")
    opened = not isinstance(target, Runnable)
    r = open_runnable(target, backend=cfg.backend, **_open_options(cfg)) if opened else target
    try:
        return _run(r, wanted, cfg, progress)
    finally:
        if opened:
            r.close()


def _run(r: Runnable, wanted: list[str], cfg: EvalConfig, progress: Progress | None
         ) -> EvalResult:
    res = EvalResult(model=r.identity(), backend=r.backend, metrics=wanted,
                     versions=installed_versions("llama_cpp_python"))
    if res.model.get("llama_extra_bufts") is False:
        res.notes.append("llama.cpp ran without its extra buffer types (AMX kernels, weight "
                         "repacking): they crash on this machine (see "
                         "edgequant.backends.llamacpp.extra_bufts_supported)")
    timer = _Timer(res.timings)
    stream = None
    if {"ppl", "kld", "speed", "memory"} & set(wanted):
        from ..data.tokens import corpus_tokens

        with timer("tokens"):
            stream = corpus_tokens(cfg.corpus, r)
    # accuracy metrics: this process's memory and speed are not what is being measured
    with getattr(r, "weights_cached", nullcontext)():
        if {"ppl", "kld"} & set(wanted):
            assert stream is not None
            _stream_metrics(r, stream, wanted, cfg, progress, res, timer)
        if "tasks" in wanted:
            from ..data.tasks import load_task, task_split
            from .tasks import score_items

            for name in cfg.tasks:
                with timer(f"task:{name}"):
                    items = load_task(name, cfg.limit, cfg.seed)
                    res.tasks[name] = {**score_items(r, items, progress, name),
                                       "split": task_split(name)}
        if "generate" in wanted:
            _generations(r, cfg, res, timer)
    if "size" in wanted:
        with timer("size"):
            info = r.size_info()
        for k in ("size_bytes", "size_on_disk", "bits_per_weight", "bits_per_weight_total",
                  "num_params"):
            setattr(res, k, info.get(k))
    if {"speed", "memory"} & set(wanted):
        with timer("speed+memory"):
            _speed_memory(r, stream, cfg, res)
    return res


def _stream_metrics(r: Runnable, stream: Any, wanted: list[str], cfg: EvalConfig,
                    progress: Progress | None, res: EvalResult, timer: _Timer) -> None:
    from .kld import base_distribution, summarize
    from .perplexity import make_windows, score_windows

    windows = make_windows(stream, cfg.ctx, r.bos_id, cfg.max_tokens, cfg.ppl_half)
    res.corpus, res.ctx, res.ppl_half = cfg.corpus, cfg.ctx, cfg.ppl_half
    res.windows, res.tokens_scored = windows.n, windows.tokens_scored
    base = None
    if "kld" in wanted:
        with timer("kld_base"), _opened(cfg.kld_base, cfg) as b:
            _check_same_tokenizer(r, b)
            base = base_distribution(b, windows, cfg.kld_topk, cfg.kld_tail, progress)
        res.kld_base, res.kld_topk, res.kld_tail = base.meta.get("base"), cfg.kld_topk, \
            cfg.kld_tail
        res.kld_base_cached = bool(base.meta.get("cached"))
        if not base.meta.get("cache_file"):
            res.notes.append("the KLD base lives only in memory: its distributions were "
                             "computed, not cached")
    with timer("ppl+kld" if base is not None else "ppl"):
        scores = score_windows(r, windows, base, progress)
    res.ppl, res.nll_mean = scores.ppl, float(scores.nll.mean())
    if base is not None and scores.kld is not None and scores.top1 is not None:
        for k, v in summarize(scores.kld, scores.top1).items():
            setattr(res, k, v)
        import math

        res.ppl_base = math.exp(-float(base.target_logp.mean()))


def _check_same_tokenizer(r: Runnable, b: Runnable) -> None:
    if b.tokenizer_fingerprint() != r.tokenizer_fingerprint():
        raise EvaluationError(
            f"KLD compares distributions over the same tokens, but the base {b.name} "
            f"tokenizes differently from {r.name} (tokenizer fingerprints "
            f"{b.tokenizer_fingerprint()[:12]} ≠ {r.tokenizer_fingerprint()[:12]}); "
            "use a base with the same tokenizer")
    if b.vocab_size != r.vocab_size:
        raise EvaluationError(f"the base {b.name} has {b.vocab_size} logits per row but "
                              f"{r.name} has {r.vocab_size}; KLD needs the same vocabulary")


def _generations(r: Runnable, cfg: EvalConfig, res: EvalResult, timer: _Timer) -> None:
    from .generate import generate_samples, save_generations

    with timer("generate"):
        res.generations = generate_samples(engine_of(r), max_new_tokens=cfg.generate_tokens)
    if cfg.generate_out:
        meta = {"model": res.model, "backend": r.backend, "max_new_tokens": cfg.generate_tokens,
                "greedy": True}
        res.generations_file = str(save_generations(cfg.generate_out, res.generations, meta))


def _speed_memory(r: Runnable, stream: Any, cfg: EvalConfig, res: EvalResult) -> None:
    from .memory import measure_fresh
    from .speed import measure_speed, speed_prompt

    prompt = speed_prompt(stream, r.bos_id, r.vocab_size, cfg.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="edgequant-eval-") as scratch:
        spec = r.reopen_spec(scratch)  # type: ignore[arg-type]
        if spec is None:
            res.notes.append(f"{r.name} cannot be reopened in a fresh process: speed measured "
                             "in this process, memory not measured")
            sp = measure_speed(engine_of(r), prompt, cfg.new_tokens, cfg.speed_runs,
                               cfg.warmup).to_dict()
        else:
            options = r.reopen_options()
            if "dtype" in options:  # a torch model: reopened in the deployment dtype
                options["dtype"] = cfg.speed_dtype
            sp = measure_fresh(spec, r.backend, prompt, cfg.new_tokens, cfg.speed_runs,
                               cfg.warmup, cfg.threads, options,
                               timeout=cfg.speed_timeout)
            res.peak_rss_mb, res.rss_before_load_mb = sp["peak_rss_mb"], sp["rss_before_load_mb"]
            res.peak_cuda_mb = sp.get("peak_cuda_mb")
    res.prefill_tps, res.decode_tps, res.threads = sp["prefill_tps"], sp["decode_tps"], \
        sp["threads"]
    res.speed = sp


# --- helpers --------------------------------------------------------------------------------


def _config(config: EvalConfig | None, options: dict[str, Any]) -> EvalConfig:
    cfg = config or EvalConfig()
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = set(options) - names
    if unknown:
        raise EvaluationError(f"unknown evaluate option(s) {', '.join(sorted(unknown))}; "
                              f"known: {', '.join(sorted(names))}")
    if isinstance(options.get("tasks"), str):
        options["tasks"] = tuple(t for t in options["tasks"].split(",") if t)
    elif options.get("tasks") is not None:
        options["tasks"] = tuple(options["tasks"])
    cfg = dataclasses.replace(cfg, **options)
    resolve_compute_dtype(cfg.speed_dtype, EvaluationError, "speed_dtype")
    return cfg


def _open_options(cfg: EvalConfig) -> dict[str, Any]:
    return {"threads": cfg.threads} if cfg.threads is not None else {}


@contextmanager
def _opened(source: Any, cfg: EvalConfig) -> Iterator[Runnable]:
    if isinstance(source, Runnable):
        yield source
        return
    r = open_runnable(source, **_open_options(cfg))
    try:
        yield r
    finally:
        r.close()


class _Timer:
    def __init__(self, into: dict[str, float]) -> None:
        self.into = into

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - t0
