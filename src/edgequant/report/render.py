"""``render_report(DIR)``: ``report.md``, ``report.html`` and ``plots/*.png`` from ``results.db``.

The report is made from the database alone (``edgequant report DIR`` regenerates it at any
time). It compares only the cells measured with the latest run's evaluation settings; cells
measured otherwise are counted and left out, never mixed in.
"""

from __future__ import annotations

import datetime as _dt
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..comparison.matrix import Settings, eval_hash
from ..comparison.store import ErrorRow, ResultRow, Store, StoreError
from ..io_utils import atomic_file
from . import plots
from .recommend import Pairing, Pick, default_budgets, equal_memory, recommendations
from .tables import KERNELS_HEADER, kernel_text, main_table, markdown, numeric_columns, sort_rows

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS = "plots"


@dataclass
class Figure:
    title: str
    path: str  # relative to the report
    caption: str


@dataclass
class ReportData:
    """Everything the two renderings show (one source of truth for both)."""

    out_dir: Path
    run: dict[str, Any]
    settings: Settings
    rows: list[ResultRow]
    errors: list[ErrorRow]
    excluded: int
    incomplete: list[ErrorRow] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)  # the runs behind the rows
    figures: list[Figure] = field(default_factory=list)
    picks: list[Pick] = field(default_factory=list)
    pairings: list[Pairing] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    generations: dict[str, list[tuple[ResultRow, str]]] = field(default_factory=dict)
    caveats: list[str] = field(default_factory=list)
    runtimes: dict[int, dict[str, Any]] = field(default_factory=dict)  # result id → speed's

    def kernel_cells(self) -> dict[int, str]:
        """Result id → the kernels its speed run recorded (empty when none did)."""
        cells = {rid: kernel_text(rt) for rid, rt in self.runtimes.items()}
        return cells if any(c != kernel_text(None) for c in cells.values()) else {}


def render_report(out_dir: str | Path) -> Path:
    """Write the report of ``out_dir/results.db``; returns the Markdown file's path."""
    out = Path(out_dir)
    with Store(out, create=False) as store:
        data = collect(store, out)
    md = out / REPORT_MD
    for path, text in ((md, to_markdown(data)), (out / REPORT_HTML, to_html(data))):
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)  # a report is for reading (the temporary file is 0600)
    return md


def collect(store: Store, out: Path) -> ReportData:
    runs = store.runs()
    if not runs:
        raise StoreError(f"{store.path} holds no run yet; run `edgequant compare -o {out}`")
    run = runs[-1]
    settings = Settings.from_dict(run["settings"] or {})
    eh = eval_hash(settings)
    rows = store.results(eh)
    models = list(dict.fromkeys(c for c in _cell_models(store, eh)))
    rows = sort_rows(rows, models or None)
    excluded = len(store.results()) - len(rows)
    behind = {r.run_id for r in rows}
    used = [r for r in runs if r["id"] in behind] or [run]
    # host and versions: of the latest run that produced a shown result
    data = ReportData(out, used[-1], settings, rows, store.open_errors(eh), excluded,
                      store.incomplete(eh), used)
    data.budgets = list(settings.budgets_mb) if settings.budgets_mb else default_budgets(rows)
    data.picks = recommendations(rows, data.budgets)
    if len({r.model for r in rows}) > 1:
        data.pairings = equal_memory(rows, data.budgets)
    data.figures = _figures(store, rows, out)
    for r in rows:
        for g in store.generations(r.result_id):
            data.generations.setdefault(g["prompt"], []).append((r, g["output"] or ""))
    loads = [(r.get("host") or {}) for r in used]
    busiest = max(loads, key=lambda h: (h.get("loadavg") or [0.0])[0])
    data.runtimes = _runtimes(store, rows)
    data.caveats = caveats(rows, settings, busiest, data.runtimes)
    return data


def _runtimes(store: Store, rows: list[ResultRow]) -> dict[int, dict[str, Any]]:
    """The ``runtime`` each row's speed run recorded (dtype, device, kernels), if any."""
    import json

    out = {}
    for r in rows:
        got = store.db.execute("SELECT eval FROM results WHERE id=?", (r.result_id,)).fetchone()
        speed = (json.loads(got[0]) if got and got[0] else {}).get("speed") or {}
        if isinstance(speed.get("runtime"), dict):
            out[r.result_id] = speed["runtime"]
    return out


def _cell_models(store: Store, eh: str) -> list[str]:
    return [r[0] for r in store.db.execute(
        "SELECT model FROM cells WHERE eval_hash=? ORDER BY rowid", (eh,))]


# --- figures ------------------------------------------------------------------------------------


def _figures(store: Store, rows: list[ResultRow], out: Path) -> list[Figure]:
    d = out / PLOTS
    figs: list[Figure] = []
    if not rows:
        return figs
    plots.size_scatter(rows, "kld_mean", d / "size_vs_kld.png", log=True,
                       ylabel="mean KLD vs the fp baseline (log)", title="size vs KLD")
    figs.append(Figure("Size vs KLD", f"{PLOTS}/size_vs_kld.png",
                       "Mean KL divergence from the same model's fp baseline (log scale) "
                       "against the weights' size; the line and rings mark the Pareto front."))
    plots.size_scatter(rows, "ppl", d / "size_vs_ppl.png", log=False, ylabel="perplexity",
                       title="size vs perplexity")
    figs.append(Figure("Size vs perplexity", f"{PLOTS}/size_vs_ppl.png",
                       "Perplexity against size; dotted: the baseline's; line and rings: the "
                       "Pareto front."))
    if len({r.model for r in rows}) > 1:
        plots.size_scatter(rows, "bpb", d / "size_vs_bpb.png", log=False,
                           ylabel="bits per byte (tokenizer-independent)",
                           title="size vs bits per byte, all models")
        figs.append(Figure("Size vs bits per byte (models compared)", f"{PLOTS}/size_vs_bpb.png",
                           "Bits per UTF-8 byte of the scored text: comparable across "
                           "tokenizers, unlike perplexity and KLD."))
    plots.speed_bars(rows, d / "speed.png")
    figs.append(Figure("Speed", f"{PLOTS}/speed.png",
                       "Median prefill and decode tokens/s, each measured in a fresh process."))
    for model in dict.fromkeys(r.model for r in rows):
        series = [(r.label, store.result_layer_errors(r.result_id)) for r in rows
                  if r.model == model]
        series = [(lab, errs) for lab, errs in series if errs]
        if not series:
            continue
        name = f"layer_error_{_slug(model)}.png"
        plots.layer_heatmap(series, d / name, f"{model}: per-layer relative weight error "
                            "‖W−Ŵ‖/‖W‖ (our artifacts, read back from the files)")
        figs.append(Figure(f"Per-layer error: {model}", f"{PLOTS}/{name}",
                           "Mean relative weight error of each block's linear layers (left) and "
                           "of each role over all blocks (right), from the artifact vs the "
                           "source."))
    return figs


def _slug(s: str) -> str:
    from ..comparison.runner import slug

    return slug(s)


# --- caveats ------------------------------------------------------------------------------------


def caveats(rows: list[ResultRow], s: Settings, host: dict[str, Any] | None = None,
            runtimes: dict[int, dict[str, Any]] | None = None) -> list[str]:
    from ..models import zoo

    out = []
    load, cpus = (host or {}).get("loadavg"), (host or {}).get("cpus")
    if load and cpus and load[0] > cpus:
        out.append(f"**The machine was busy**: load average {load[0]:g} on {cpus} CPUs when "
                   "the run started, so the speed figures (tok/s) are lower and noisier than "
                   "on an idle machine; sizes, perplexity, KLD and accuracy do not depend on "
                   "it.")
    zoo_models = [m for m in dict.fromkeys(r.model for r in rows) if m in zoo.ZOO]
    if zoo_models:
        parts = []
        for m in zoo_models:
            e = zoo.ZOO[m]
            parts.append(f"`{m}` ({e.gguf_file}; "
                         + ("channel-permuted with seed " f"{e.seed} to break that grid)"
                            if e.permute else "**not** permuted: it still sits on that grid)"))
        out.append("The zoo's base weights were dequantized from a 4-bit GGUF file, so they "
                   "sat on a 4-bit grid (a free lunch for formats with the same blocks). The "
                   "default zoo models are channel-permuted — an exact permutation that keeps "
                   "the function and removes the alignment — so every format starts from an "
                   "unaligned model: " + "; ".join(parts) + ".")
    out.append("Rows are compared by **measured** bits per weight and bytes, not by format "
               "name: `bits/weight` counts every stored byte of the quantized linear layers "
               "(codes, scales, zeros, mixtures of tensor types); `size MB` is the weights' "
               "bytes as stored (1 MB = 10⁶ bytes).")
    if any(r.kind == "gguf" or r.method.startswith("llamacpp") for r in rows):
        out.append("llama.cpp's K-quants work on rows of 256: for rows not divisible by 256 "
                   "(SmolLM2's hidden size is 576) llama.cpp falls back to other types "
                   "(q4_K→q5_0, q5_K→q5_1, q6_K→q8_0, q2_K/q3_K→q4_0), so a \"Q4_K_M\" file "
                   "there is ~5.5 bits per weight over the linear layers — see its measured "
                   "bits/weight. llama.cpp's runtime also adds ~0.003–0.005 KLD of its own "
                   "(quantized activations inside quantized matmuls, f16 KV cache).")
    out.append("Peak RSS is the whole fresh process that loads the model and runs the speed "
               "test: a torch process carries torch itself (hundreds of MB), a GGUF file runs "
               "in a process with llama.cpp and numpy only.")
    if any(r.kind == "native" for r in rows):
        out.append(_kernel_caveat([r for r in rows if r.kind == "native"], runtimes or {}))
    if any(r.kind == "native" and r.method in ("awq", "smoothquant") for r in rows):
        out.append("Per-layer errors of AWQ/SmoothQuant artifacts are measured after fitting "
                   "the per-channel scales those methods fold into the weights "
                   "(‖W′−Ŵ‖/‖W′‖, W′ = diag(r)·W·diag(c) by least squares).")
    out.append(f"KLD is against the fp baseline of the same model over the same {s.max_tokens} "
               f"tokens ({s.ctx}-token windows of `{s.corpus}`), with the base's top-{s.kld_topk} "
               "tokens kept per position: a tight lower bound of the exact KLD.")
    return out


def _kernel_caveat(native: list[ResultRow], runtimes: dict[int, dict[str, Any]]) -> str:
    """What each kernel that ran our native rows' speed tests computes, and why layers fell
    back to the reference kernel — from what the runs recorded."""
    summaries: dict[str, str] = {}
    fallbacks: dict[str, list[int]] = {}
    for r in native:
        rt = runtimes.get(r.result_id) or {}
        summaries.update(rt.get("kernel_summaries") or {})
        for why, n in (rt.get("kernel_fallbacks") or {}).items():
            fallbacks.setdefault(why, []).append(n)
    if not summaries:
        return ("Our native artifacts' speed runs recorded no kernel choice (made before the "
                "kernel registry): 4-bit layers ran on torch's fused int4 kernel in bfloat16, "
                "every other quantized layer dequantized its weights on every step.")
    text = ("Our native artifacts run each quantized layer on the kernel that the "
            f"`{KERNELS_HEADER}` column counts (layers per kernel): " +
            "; ".join(f"`{k}`: {v}" for k, v in sorted(summaries.items())) + ".")
    if "reference" in summaries:
        text += (" Layers on `reference` dequantize every weight on every step, so a row "
                 "whose layers are mostly there runs at a reference implementation's speed, "
                 "not a deployment kernel's.")
    if fallbacks:
        text += " Layers not on a faster kernel, and why: " + "; ".join(
            f"{why} ({_n(sum(ns), 'layer')} in {_n(len(ns), 'cell')})"
            for why, ns in sorted(fallbacks.items(), key=lambda kv: -sum(kv[1]))[:8]) + "."
    return text


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


# --- Markdown ---------------------------------------------------------------------------------


def _row_name(r: ResultRow | None, with_model: bool = False) -> str:
    if r is None:
        return "—"
    return (f"`{r.short}` " + (f"{r.model}: " if with_model else "") + r.label
            + (f" ({r.tool})" if r.kind == "peer" else ""))


def _settings_lines(data: ReportData) -> list[str]:
    s, run = data.settings, data.run
    host = run.get("host") or {}
    ver = run.get("versions") or {}
    tasks = (f"{', '.join(s.tasks)} ({s.limit if s.limit else 'all'} items each, seed "
             f"{s.task_seed})") if s.tasks else "off"
    runs = data.runs or [run]
    return [
        *(f"- run {r['id']} ({r.get('preset') or 'custom'}), started {r['started']}, finished "
          f"{r.get('finished') or '—'}, status **{r['status']}**" for r in runs),
        f"- host: {host.get('cpu_model') or host.get('machine', '?')}, {host.get('cpus', '?')} "
        f"CPUs, {host.get('mem_gb', '?')} GB, Python {host.get('python', '?')}, load average "
        f"at start {(host.get('loadavg') or ['?'])[0]}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(ver.items())),
        f"- perplexity/KLD: `{s.corpus}`, {s.max_tokens} tokens in windows of {s.ctx} "
        f"(KLD top-{s.kld_topk}, against each model's fp baseline)",
        f"- speed and memory: fresh process, {s.prompt_tokens}-token prompt then "
        f"{s.new_tokens} greedy tokens, median of {s.speed_runs} runs after {s.warmup} warm-up, "
        f"threads {s.threads or 'backend default'}",
        f"- tasks: {tasks}",
        f"- calibration (GPTQ, AWQ, …): `{s.calib_corpus}`, {s.calib_samples} × {s.calib_len} "
        f"tokens, seed {s.calib_seed} (second half of the stream; evaluation reads the first)",
    ]


def to_markdown(data: ReportData) -> str:
    models = ", ".join(dict.fromkeys(r.model for r in data.rows)) or "no results"
    L: list[str] = [f"# edgequant compare — {models}",
                    "", f"_Generated {_now()} from `results.db` by `edgequant report "
                    f"{data.out_dir}`._", "", "## Setup", "", *_settings_lines(data), ""]
    L += ["## Results", ""]
    if data.rows:
        kernels = data.kernel_cells()
        headers, body = main_table(data.rows, kernels)
        L.append(markdown(headers, body, numeric_columns(bool(kernels))))
        L += ["", "Every number above is `metrics.value` in `results.db` for the latest "
              "`results` row of the cell whose hash starts with the `cell` column (size MB = "
              "`size_mb`, top-1 % = 100 × `top1`, task acc % = 100 × `task_acc`, the mean "
              "`acc` over the tasks)."]
        if kernels:
            L[-1] += (f" `{KERNELS_HEADER}`: the kernels the speed test's quantized layers ran "
                      "on, as its `runtime` recorded them (see the caveats).")
    else:
        L.append("No finished cells yet.")
    if data.excluded:
        L += ["", f"{data.excluded} finished cell(s) measured with other evaluation settings "
              "are not shown."]
    if data.errors:
        L += ["", "### Failed cells", "", "The full tracebacks are in the `errors` table.", ""]
        L.append(markdown(["cell", "model", "method", "tool", "step", "error"],
                          _error_rows(data.errors)))
    if data.incomplete:
        L += ["", "### Incomplete measurements", "", "These cells are in the table; the "
              "measurement named here failed (its columns show –).", ""]
        L.append(markdown(["cell", "model", "method", "tool", "step", "error"],
                          _error_rows(data.incomplete)))
    L += ["", "## Recommendations", ""]
    for p in data.picks:
        L.append(f"- **{p.model} — {p.constraint}:** {_row_name(p.row)} — {p.why}")
    if data.pairings:
        L += ["", "## Models at equal memory", "", _pairing_intro(data), ""]
        L.append(markdown(*_pairing_table(data)))
    L += ["", "## Plots", ""]
    for f in data.figures:
        L += [f"### {f.title}", "", f"![{f.title}]({f.path})", "", f.caption, ""]
    if data.generations:
        L += ["## Sample generations", "", f"Greedy, {data.settings.generate_tokens} new tokens, "
              "chat template when the model has one.", ""]
        for prompt, outs in data.generations.items():
            L += [f"**{prompt}**", ""]
            multi = len({r.model for r, _ in outs}) > 1
            L.append(markdown(["cell", "output"], [[_row_name(r, multi), _oneline(o)]
                                                   for r, o in outs]))
            L.append("")
    L += ["## Caveats", ""] + [f"- {c}" for c in data.caveats] + [""]
    return "\n".join(L)


def _error_rows(errors: list[ErrorRow]) -> list[list[str]]:
    return [[e.cell_hash[:8], e.model, e.label, e.tool, e.step,
             f"{e.type}: {_first(e.message)}"] for e in errors]


def _pairing_intro(data: ReportData) -> str:
    measure = data.pairings[0].measure if data.pairings else "bpb"
    what = ("mean task accuracy (higher is better)" if measure == "task_acc" else
            "bits per byte of the scored text (lower is better; perplexity and KLD do not "
            "compare across tokenizers)")
    return (f"For each memory budget (weights as stored), the best cell of each model within "
            f"it, ranked by {what}. This is where a larger model quantized hard meets a "
            f"smaller one kept wider.")


def _pairing_table(data: ReportData) -> tuple[list[str], list[list[str]]]:
    models = list(dict.fromkeys(r.model for r in data.rows))
    measure = data.pairings[0].measure
    headers = ["budget MB"] + [f"{m}: best ({measure}, MB, peak RSS MB)" for m in models]
    body = []
    for p in data.pairings:
        row = [f"{p.budget_mb:g}"]
        for m in models:
            r = p.best.get(m)
            if r is None:
                row.append("nothing fits")
            else:
                v = r.m(measure)
                row.append(f"{_row_name(r)}: {v:.4f}, {r.m('size_mb'):.1f} MB, "
                           f"{_fmt0(r.m('peak_rss_mb'))} MB")
        body.append(row)
    return headers, body


def _fmt0(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _first(s: str) -> str:
    lines = [x for x in s.splitlines() if x.strip()]
    return (lines[0] if lines else "")[:240]


def _oneline(s: str, limit: int = 240) -> str:
    t = " ⏎ ".join(x.strip() for x in s.strip().splitlines() if x.strip())
    return t if len(t) <= limit else t[:limit] + "…"


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --- HTML ---------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:1rem 0;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}code{background:#f3f3f3;padding:0 .2rem}
img{max-width:100%;border:1px solid #ddd}figure{margin:1.5rem 0}
figcaption{font-size:.85rem;color:#555}.err{color:#a00}
"""


def _t(headers: list[str], body: list[list[str]], numeric: list[bool] | None = None,
       table_id: str = "", markup: frozenset[int] = frozenset()) -> str:
    """An HTML table; cells in the ``markup`` columns are Markdown-inline (cell names in
    backticks), the rest plain text."""
    numeric = numeric or [False] * len(headers)
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)

    def cell(i: int, c: str, num: bool) -> str:
        text = _md_inline(c) if i in markup else html.escape(c)
        return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"

    rows = "".join("<tr>" + "".join(cell(i, c, n) for i, (c, n) in
                                    enumerate(zip(row, numeric, strict=True))) + "</tr>"
                   for row in body)
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def to_html(data: ReportData) -> str:
    e = html.escape
    models = ", ".join(dict.fromkeys(r.model for r in data.rows)) or "no results"
    parts = [f"<h1>edgequant compare — {e(models)}</h1>",
             f"<p><em>Generated {e(_now())} from <code>results.db</code>.</em></p>",
             "<h2>Setup</h2><ul>" + "".join(f"<li>{_md_inline(s[2:])}</li>" for s in
                                          _settings_lines(data)) + "</ul>", "<h2>Results</h2>"]
    if data.rows:
        kernels = data.kernel_cells()
        headers, body = main_table(data.rows, kernels)
        parts.append(_t(headers, body, numeric_columns(bool(kernels)), "results"))
        parts.append("<p>Every number is <code>metrics.value</code> in <code>results.db</code> "
                     "for the latest result of the cell named in the <code>cell</code> "
                     "column.</p>")
    else:
        parts.append("<p>No finished cells yet.</p>")
    if data.excluded:
        parts.append(f"<p>{data.excluded} finished cell(s) measured with other evaluation "
                     "settings are not shown.</p>")
    if data.errors:
        parts.append("<h3>Failed cells</h3>")
        parts.append(_t(["cell", "model", "method", "tool", "step", "error"],
                        _error_rows(data.errors), table_id="errors"))
    if data.incomplete:
        parts.append("<h3>Incomplete measurements</h3><p>These cells are in the table; the "
                     "measurement named here failed (its columns show –).</p>")
        parts.append(_t(["cell", "model", "method", "tool", "step", "error"],
                        _error_rows(data.incomplete), table_id="incomplete"))
    parts.append("<h2>Recommendations</h2><ul>" + "".join(
        f"<li><strong>{e(p.model)} — {e(p.constraint)}:</strong> {_md_inline(_row_name(p.row))} — "
        f"{e(p.why)}</li>" for p in data.picks) + "</ul>")
    if data.pairings:
        parts.append("<h2>Models at equal memory</h2>")
        parts.append(f"<p>{e(_pairing_intro(data))}</p>")
        headers, body = _pairing_table(data)
        parts.append(_t(headers, body, table_id="equal-memory",
                        markup=frozenset(range(1, len(headers)))))
    parts.append("<h2>Plots</h2>")
    for f in data.figures:
        parts.append(f'<figure><h3>{e(f.title)}</h3><img src="{e(f.path)}" '
                     f'alt="{e(f.title)}"><figcaption>{e(f.caption)}</figcaption></figure>')
    if data.generations:
        parts.append("<h2>Sample generations</h2>")
        for prompt, outs in data.generations.items():
            parts.append(f"<h4>{e(prompt)}</h4>")
            multi = len({r.model for r, _ in outs}) > 1
            parts.append(_t(["cell", "output"], [[_row_name(r, multi), o.strip()]
                                                 for r, o in outs], markup=frozenset({0})))
    parts.append("<h2>Caveats</h2><ul>" + "".join(f"<li>{_md_inline(c)}</li>"
                                                  for c in data.caveats) + "</ul>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<title>edgequant compare — {e(models)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def _md_inline(text: str) -> str:
    """A Markdown-inline line (the report's text: ``code`` and **bold**) as HTML, escaped."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", t)
