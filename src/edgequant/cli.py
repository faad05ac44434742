"""The ``edgequant`` command: a thin shell over the Python API.

It parses arguments, shows progress and prints errors; every decision lives in the library.
User errors (``EdgequantError``) print in one or two lines, no traceback, exit status 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand

from .errors import EdgequantError

app = typer.Typer(help="Quantize language models for edge devices and measure what it cost.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
zoo_app = typer.Typer(help="Real models this machine can fetch without a hub.",
                      no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console(stderr=True)
out = Console()


def _fail(e: EdgequantError) -> None:
    console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _run(fn: Callable[[], Any]) -> Any:
    """Run a command's work: what a library prints goes to stderr (stdout holds our results
    alone, so ``--json`` output parses); user errors print in one line, exit status 2."""
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return fn()
    except EdgequantError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def _progress_fn(quiet: bool) -> Callable[[Iterable[Any], int, str], Iterable[Any]]:
    def track(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
        if quiet or not console.is_terminal:  # a bar in a log file is only blank lines
            yield from items
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=quiet,
                      transient=True) as bar:
            task = bar.add_task(what, total=total)
            for item in items:
                yield item
                bar.advance(task)
    return track


@app.command()
def quantize(
    source: str = typer.Argument(..., help="Zoo name, HF folder, hub id or .gguf file."),
    output: Path = typer.Option(..., "-o", "--output", help="Artifact folder to write."),
    recipe: str = typer.Option("rtn", "--recipe", "--method", "-m", help="Quantizer, or "
                               "transforms then a quantizer joined by '+': rtn, gptq, hqq, awq, "
                               "smoothquant, awq+gptq, … (see `edgequant methods`)."),
    scheme: str = typer.Option("w4g128", "--scheme", "-s", help="Scheme short name, e.g. "
                               "w4g128, w3g128-asym, w8, nf4, fp8."),
    override: list[str] = typer.Option([], "--override", help="PATTERN=SCHEME (or "
                                       "PATTERN=keep), e.g. 'lm_head=w8' or '*.down_proj=w8'."),
    keep_dtype: str = typer.Option("float16", help="dtype for unquantized tensors."),
    option: list[str] = typer.Option([], "--set", help="Step option KEY=VALUE, e.g. "
                                     "'act_order=true' or 'gptq.damp=0.02' (STEP.KEY when "
                                     "several steps have KEY)."),
    calib: str = typer.Option("wiki", "--calib", help="Calibration corpus (wiki, lambada, "
                              "shakespeare) or a text file; only for recipes that need data."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    calib_len: int = typer.Option(512, "--calib-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    calib_dtype: str = typer.Option("auto", "--calib-dtype", help="Precision of the "
                                    "calibration forwards: auto (bf16 where the CPU has it), "
                                    "float32, bfloat16."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Quantize SOURCE by a recipe and save a native artifact."""

    def go() -> dict[str, Any]:
        from . import load
        from . import quantize as eq_quantize
        from .data.calibration import calibration
        from .io_utils import check_output
        from .methods.registry import parse_options
        from .models.manifest import artifact_info
        from .recipe import Recipe

        # everything the user typed is checked before the model is loaded
        plan = Recipe.parse(recipe, scheme, parse_options(option, "--set"),
                            formats=_pairs(override, "--override", "PATTERN=SCHEME"),
                            keep_dtype=keep_dtype)
        plan.check_native()
        spec = calibration(calib, calib_samples, calib_len, seed, calib_dtype)
        check_output(output, force)
        if not quiet:
            console.print(f"loading {source} …")
        q = eq_quantize(load(source), plan, calib=spec, inplace=True,
                        progress=_progress_fn(quiet))
        q.save(output, force=force)
        return artifact_info(output)

    info = _run(go)
    if as_json:
        typer.echo(json.dumps(info))
    elif not quiet:
        _print_info(info)
        console.print(f"[green]saved[/] {output}")


def _pairs(items: list[str], flag: str, form: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EdgequantError(f"{flag} takes {form}, not {item!r}")
        out.append((key, value))
    return out


def _print_info(info: dict[str, Any]) -> None:
    kern = info.get("kernels")
    table = Table(title="quantized layers" + (f" (kernels for {kern['dtype']} activations, "
                                               f"policy {kern['policy']})" if kern else ""))
    cols = ["layer", "scheme", "shape", "bits/weight", "bytes"] + (["kernel"] if kern else [])
    for col in cols:
        table.add_column(col, justify="right" if col in ("bits/weight", "bytes") else "left")
    for name, rec in info["layers"].items():
        row = [name, rec["scheme"], "×".join(map(str, rec["shape"])),
               f"{rec['bits_per_weight']:.3f}", f"{rec['nbytes']:,}"]
        if kern:
            k = kern["layers"].get(name, {})
            row.append(str(k.get("kernel", "-")) + (f" ({k['reason']})" if k.get("reason")
                                                    else ""))
        table.add_row(*row)
    out.print(table)
    bpw = info["bits_per_weight"]
    out.print(f"parameters: {info['num_params']:,}   quantized layers: "
              f"{info['quantized_layers']}   bits/weight (quantized layers): "
              + (f"{bpw:.4f}" if bpw else "-"), soft_wrap=True)
    out.print(f"bits/weight (whole model): {info['bits_per_weight_total']:.4f}   "
              f"weights on disk: {info['size_bytes'] or 0:,} bytes", soft_wrap=True)


@app.command()
def info(
    artifact: Path = typer.Argument(..., help="A native artifact folder."),
    kernels: str | None = typer.Option(None, "--kernels", help="Also show the kernel each "
                                       "layer would run on here: auto | reference | a kernel "
                                       "name (loads torch)."),
    dtype: str = typer.Option("auto", "--dtype", help="With --kernels: the activation dtype "
                              "(auto: bfloat16 where the CPU has it, else float32)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per-layer schemes, bits per weight and sizes of an artifact (and, with --kernels, the
    kernel each layer would run on this machine and why not a faster one)."""
    from .models.manifest import artifact_info

    def go() -> dict[str, Any]:
        summary = artifact_info(artifact)
        if kernels is not None:
            from .compute import dtype_name, resolve_compute_dtype
            from .errors import ModelLoadError
            from .kernels import describe
            from .models.manifest import read_manifest

            act = resolve_compute_dtype(dtype, ModelLoadError, "--dtype")
            rows = describe(read_manifest(artifact)["layers"], act, "cpu", kernels)
            summary["kernels"] = {"dtype": dtype_name(act), "policy": kernels,
                                  "layers": {r["layer"]: {"kernel": r["kernel"],
                                                          "reason": r.get("reason")}
                                             for r in rows}}
        return summary

    summary = _run(go)
    if as_json:
        typer.echo(json.dumps(summary, default=str))
    else:
        _print_info(summary)


@app.command("methods")
def methods_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Quantizers and transforms a recipe can name, with their options and defaults."""
    import dataclasses

    from .methods.registry import get_step, list_methods

    rows: list[dict[str, Any]] = []
    for name in list_methods():
        step = get_step(name)
        options = {f.name: f.default for f in dataclasses.fields(step.config_cls)}
        rows.append({"name": name, "kind": step.kind, "aliases": list(step.aliases),
                     "needs": sorted(getattr(step, "needs", ())), "options": options,
                     "description": step.description})
    if as_json:
        typer.echo(json.dumps(rows, default=str))
        return
    table = Table(title="recipe steps: transforms first, then one quantizer (awq+gptq)")
    for col in ("name", "kind", "options (defaults)", "description"):
        table.add_column(col)
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        table.add_row(r["name"], r["kind"], opts, r["description"])
    out.print(table)


@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The models the zoo knows, and whether they are cached."""
    from .models import zoo

    entries = zoo.catalog()
    if as_json:
        typer.echo(json.dumps(entries))
        return
    table = Table()
    for col in ("name", "description", "cached"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["name"], e["description"], "yes" if e["cached"] else "no")
    out.print(table)


@zoo_app.command("pull")
def zoo_pull(name: str = typer.Argument(..., help="Zoo model name.")) -> None:
    """Fetch, verify and convert a zoo model into the cache."""
    from .models import zoo

    path = _run(lambda: zoo.pull(name))
    out.print(str(path))


@app.command("export")
def export_cmd(
    source: str = typer.Argument(..., help="Zoo name, HF folder, .gguf file or native artifact."),
    output: Path = typer.Option(..., "-o", "--output", help="GGUF file to write."),
    ftype: str = typer.Option("Q4_K_M", "--type", "-t", help="llama.cpp file type: F32, F16, "
                              "BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, "
                              "Q5_K_S/M, Q6_K."),
    imatrix: Path | None = typer.Option(None, "--imatrix", help="Importance matrix file "
                                        "(llama.cpp .gguf or .dat; see `edgequant imatrix`)."),
    calib: str | None = typer.Option(None, "--calib", help="Compute an importance matrix from "
                                     "this corpus (wiki, lambada, shakespeare) or text file."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration windows."),
    calib_len: int = typer.Option(512, "--calib-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    gptq: bool = typer.Option(False, "--gptq", help="GPTQ error feedback into the GGML grids "
                              "(needs --calib)."),
    override: list[str] = typer.Option([], "--override", help="PATTERN=TYPE on module names, "
                                       "after the file type's mixture, e.g. "
                                       "'model.embed_tokens=Q8_0' or '*.down_proj=Q6_K'."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Export SOURCE as a GGUF file for llama.cpp (re-quantizes a quantized artifact)."""
    from .data.calibration import calibration
    from .exporters.gguf import export

    def go() -> Path:
        if not quiet:
            console.print(f"loading {source} …")
        spec = calibration(calib, calib_samples, calib_len, seed, "float32") if calib else None
        pairs = tuple(_pairs(override, "--override", "PATTERN=TYPE"))
        return export(source, output, ftype, imatrix=imatrix, calib=spec, force=force,
                      progress=_progress_fn(quiet), gptq=gptq, overrides=pairs)

    path = _run(go)
    if not quiet:
        console.print(f"[green]wrote[/] {path} ({path.stat().st_size:,} bytes)")


@app.command("imatrix")
def imatrix_cmd(
    source: str = typer.Argument(..., help="Zoo name, HF folder, .gguf file or native artifact."),
    output: Path = typer.Option(..., "-o", "--output", help="Importance matrix file: *.gguf "
                                "(llama.cpp's format) or *.dat (its legacy format)."),
    calib: str = typer.Option("wiki", "--calib", help="Calibration corpus or text file."),
    calib_samples: int = typer.Option(64, "--calib-samples", help="Calibration windows."),
    calib_len: int = typer.Option(512, "--calib-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Compute llama.cpp's importance matrix (per-column Σx²) of SOURCE on calibration text."""
    from . import load
    from .data.calibration import calibration
    from .exporters.imatrix import collect
    from .io_utils import check_output

    def go() -> Path:
        check_output(output, force)
        if not quiet:
            console.print(f"loading {source} …")
        model = load(source)
        spec = calibration(calib, calib_samples, calib_len, seed, "float32")
        return collect(model, spec, progress=_progress_fn(quiet)).save(output)

    path = _run(go)
    if not quiet:
        console.print(f"[green]wrote[/] {path}")


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Zoo name, HF folder, artifact folder or .gguf file."),
    ppl: bool = typer.Option(False, "--ppl", help="Perplexity (and KLD with --kld-base)."),
    corpus: str = typer.Option("wiki", help="wiki | lambada | shakespeare | a text file."),
    ctx: int = typer.Option(512, help="Window length in tokens (BOS included)."),
    max_tokens: int = typer.Option(8192, "--max-tokens", help="Corpus tokens to score."),
    ppl_half: bool = typer.Option(False, "--ppl-half", help="Score only the second half of "
                                  "each window (llama.cpp's convention)."),
    kld_base: str | None = typer.Option(None, "--kld-base", help="Base model for KL "
                                        "divergence (same tokenizer)."),
    kld_topk: int = typer.Option(256, "--kld-topk", help="Base tokens cached per position."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated: hellaswag, "
                                     "arc_easy, arc_challenge, piqa, winogrande."),
    limit: int | None = typer.Option(None, "--limit", help="Items per task (seeded subset)."),
    speed: bool = typer.Option(False, "--speed", help="Prefill/decode tokens per second."),
    memory: bool = typer.Option(False, "--memory", help="Peak RSS of a fresh process."),
    size: bool = typer.Option(False, "--size", help="Bytes, bits per weight, parameters."),
    generate: bool = typer.Option(False, "--generate", help="Greedy answers to fixed prompts."),
    generate_out: Path | None = typer.Option(None, "--generate-out", help="JSON file for "
                                             "the generations."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads."),
    speed_dtype: str = typer.Option("auto", "--speed-dtype", help="dtype a torch model runs "
                                    "in for speed/memory: auto (bfloat16 where the CPU has "
                                    "native bf16) | float32 | bfloat16."),
    backend: str | None = typer.Option(None, "--backend", help="torch | llama.cpp (default: "
                                       "llama.cpp for .gguf files, torch otherwise)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Measure MODEL: perplexity, KLD, tasks, speed, memory, size. Without metric flags:
    ppl, speed, memory, size (+ kld with --kld-base, + tasks with --tasks)."""
    from . import evaluate

    flags = [m for m, on in (("ppl", ppl), ("speed", speed), ("memory", memory),
                             ("size", size), ("generate", generate or bool(generate_out)))
             if on]
    metrics = None if not flags else flags + (["kld"] if kld_base else []) + \
        (["tasks"] if tasks else [])
    options = dict(corpus=corpus, ctx=ctx, max_tokens=max_tokens, ppl_half=ppl_half,
                   kld_base=kld_base, kld_topk=kld_topk, limit=limit, threads=threads,
                   speed_dtype=speed_dtype, tasks=tasks or (), backend=backend,
                   generate_out=str(generate_out) if generate_out else None)
    res = _run(lambda: evaluate(model, metrics, progress=_progress_fn(quiet or as_json),
                                **options)).to_dict()
    if as_json:
        typer.echo(json.dumps(res, default=str))
        return
    table = Table(title=f"{model} ({res['backend']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("ppl", "tokens_scored", "ppl_base", "kld_mean", "kld_median", "kld_p99", "top1",
                "prefill_tps", "decode_tps", "threads", "peak_rss_mb", "size_bytes",
                "bits_per_weight", "bits_per_weight_total", "num_params"):
        if res.get(key) is not None:
            v = res[key]
            table.add_row(key, f"{v:,.4f}" if isinstance(v, float) else f"{v:,}")
    for name, t in res["tasks"].items():
        norm = "-" if t["acc_norm"] is None else f"{t['acc_norm']:.4f}"
        table.add_row(f"{name} acc / acc_norm (n={t['n']})", f"{t['acc']:.4f} / {norm}")
    out.print(table)
    for note in res["notes"]:
        console.print(f"[yellow]note:[/] {note}")


@app.command("compare")
def compare_cmd(
    sources: list[str] = typer.Argument(None, help="Models (zoo names, HF folders, .gguf "
                                        "files); default smollm2-135m."),
    methods: str | None = typer.Option(None, "--methods", help="Instead of the preset: "
                                       "comma-separated baseline, METHOD:SCHEME (gptq:w4g128), "
                                       "gguf:FTYPE (gguf:Q4_K_M) or peer names (bnb-nf4)."),
    preset: str = typer.Option("quick", "--preset", help="quick | paper | full."),
    output: Path = typer.Option(Path("out/compare"), "-o", "--output", help="Directory for "
                                "results.db, artifacts and the report."),
    limit: int | None = typer.Option(None, "--limit", help="Items per task (seeded subset); "
                                     "turns on arc_easy,hellaswag when the preset runs none."),
    tasks: str | None = typer.Option(None, "--tasks", help="Comma-separated task names."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="PPL/KLD tokens."),
    calib_samples: int | None = typer.Option(None, "--calib-samples", help="Calibration "
                                             "windows for GPTQ/AWQ/…"),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for speed."),
    force: bool = typer.Option(False, "--force", help="Redo finished cells."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Quantize by every method of a preset, measure every result the same way, store it in
    DIR/results.db (resuming finished cells) and write DIR/report.md and report.html."""
    from .comparison import compare as run_compare
    from .comparison.progress import RichHooks

    hooks = None if quiet or as_json else RichHooks(console)
    res = _run(lambda: run_compare(*(sources or ()), preset=preset, methods=methods,
                                   out_dir=output, force=force, hooks=hooks, argv=sys.argv,
                                   limit=limit, tasks=tasks, max_tokens=max_tokens,
                                   calib_samples=calib_samples, threads=threads))
    s = res.summary
    if as_json:
        typer.echo(json.dumps({"run_id": s.run_id, "status": s.status, "done": s.done,
                               "failed": s.failed, "skipped": s.skipped, "seconds": s.seconds,
                               "report": str(res.report) if res.report else None}))
    elif not quiet:
        console.print(f"[green]report[/] {res.report} (and report.html)")
        _suggest_chat(output)


def _suggest_chat(output: Path) -> None:
    """After a compare: the command that serves the recommended artifact beside its source,
    so the chat page's arena shows both with their measured KLD."""
    from .comparison.store import DB_NAME, Store
    from .report.recommend import chat_pick

    with Store(output / DB_NAME, create=False) as store:
        pick = chat_pick(store.results())
    if pick is not None and pick.artifact:
        console.print(f"chat with {pick.label} (and {pick.model} beside it in the arena):\n"
                      f"  edgequant serve {pick.artifact} {pick.model} --results {output}\n"
                      "  then open http://127.0.0.1:8080/", highlight=False, soft_wrap=True)


@app.command("report")
def report_cmd(
    directory: Path = typer.Argument(..., help="A compare output directory (with results.db)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing."),
) -> None:
    """Regenerate DIR/report.md, DIR/report.html and DIR/plots/ from DIR/results.db alone."""
    from .report import render_report

    path = _run(lambda: render_report(directory))
    if not quiet:
        console.print(f"[green]wrote[/] {path} and {path.with_name('report.html')}")


@app.command("serve")
def serve_cmd(
    models: list[str] = typer.Argument(..., help="Models to serve: GGUF files (llama.cpp), "
                                       "native artifacts, zoo names or HF folders (torch). "
                                       "NAME=MODEL sets the id requests use."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, help="Port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="EDGEQUANT_API_KEY",
                                       help="Require 'Authorization: Bearer KEY'."),
    parallel: int = typer.Option(4, "--parallel", "-np", help="Slots per model: requests "
                                 "generated at once (batched where the engine can)."),
    max_queue: int = typer.Option(64, help="Requests per model that may wait for a slot; "
                                  "more get 503 with Retry-After."),
    ctx: int = typer.Option(2048, "--ctx", "-c", help="Tokens per request (prompt + reply)."),
    threads: int | None = typer.Option(None, help="CPU threads per model."),
    cors: list[str] = typer.Option([], help="Allow browser calls from this origin "
                                   "(repeatable; off by default)."),
    results: Path | None = typer.Option(None, help="A compare output directory: show each "
                                        "model's measured KLD and PPL in the chat page."),
    timeout: float = typer.Option(600.0, help="Seconds a request may take, queueing "
                                  "included."),
    kernels: str | None = typer.Option(None, help="Native models: the kernel choice "
                                       "(auto, reference or a kernel's name)."),
    dtype: str = typer.Option("auto", help="Torch models compute in: auto (bfloat16 where "
                              "the CPU has it natively), bfloat16 or float32."),
) -> None:
    """Serve models over an OpenAI-compatible API, with a chat page and an arena at /."""
    import functools
    import threading

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        _fail(EdgequantError(f"serving needs {e.name}: pip install 'edgequant[serve]'"))
    from .serve import ServedModel, create_app
    from .serve.models import open_model, parse_spec, results_for

    def build() -> tuple[Any, list[ServedModel]]:
        specs = [parse_spec(m) for m in models]
        measured = results_for(results, [src for _, src in specs]) if results else {}
        served = [ServedModel(mid, loader=functools.partial(open_model, src, ctx, parallel,
                                                            threads, kernels, dtype),
                              meta={"source": src, **measured.get(src, {})})
                  for mid, src in specs]
        return create_app(served, api_key=api_key, parallel=parallel, max_queue=max_queue,
                          ctx=ctx, cors=cors or None, request_timeout=timeout or None), served

    try:
        web, served = build()
    except ValueError as e:
        _fail(EdgequantError(str(e)))
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print(f"[yellow]warning:[/] serving on {host} without --api-key: anyone who "
                      "reaches this port can use the models")
    server = uvicorn.Server(uvicorn.Config(web, host=host, port=port, log_level="warning"))
    state = web.state.server
    failed: list[str] = []

    def watch() -> None:
        state.loaded.wait()
        if state.errors:
            failed.extend(f"{k}: {v}" for k, v in state.errors.items())
            server.should_exit = True
            return
        names = ", ".join(m.id for m in served)
        console.print(f"[green]serving[/] {names} at http://{host}:{port}  (chat page: "
                      f"http://{host}:{port}/, API: http://{host}:{port}/v1)")
    console.print(f"loading {', '.join(m.id for m in served)} …")
    threading.Thread(target=watch, daemon=True).start()
    server.run()
    if failed:
        _fail(EdgequantError("could not load " + "; ".join(failed)))


# --- finetune (one block: the fine-tuning command and its progress display) ------------------


class _FinetuneCommand(TyperCommand):
    """``--merge`` with no value means ``--merge default`` (GPTQ with calibration). A click
    option takes a value or none, not either, so a bare ``--merge`` (last, or followed by
    another option) gets its value here before parsing."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, a in enumerate(args):
            fixed.append(a)
            if a == "--merge" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append("default")
        return super().parse_args(ctx, fixed)


@app.command("finetune", cls=_FinetuneCommand)
def finetune_cmd(
    source: str = typer.Argument(..., help="Native artifact folder, zoo name or HF folder."),
    output: Path = typer.Option(..., "-o", "--output", help="Run folder: checkpoint, "
                                "config.json, loss.png, and model/ or adapter/ + base/."),
    method: str = typer.Option("lora", "--method", "-m", help="lora | qlora | qat | lr-qat | "
                               "prilora."),
    data: str = typer.Option("wiki", "--data", help="wiki (or lambada, shakespeare, a text "
                             "file) | sharegpt | a chat .json/.jsonl (Alpaca, messages)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Optimizer steps."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Training tokens "
                                          "(instead of --max-steps)."),
    scheme: str = typer.Option("w4g128", "--scheme", "-s", help="How a float SOURCE is "
                               "quantized first (qlora: nf4-dq)."),
    objective: str | None = typer.Option(None, "--objective", help="kd (distillation from "
                                         "the unquantized model) | ce; default kd on text, "
                                         "ce on chat data."),
    teacher: str | None = typer.Option(None, "--teacher", help="The unquantized model for kd "
                                       "(default: the float source / the artifact's source)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (default: the "
                                    "method's: qat 3e-4, lr-qat 1e-2, lora/qlora/prilora "
                                    "1e-3)."),
    schedule: str = typer.Option("cosine", "--schedule", help="cosine | constant."),
    warmup: int = typer.Option(10, "--warmup", help="Warm-up steps."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per example."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per micro-batch."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per step."),
    save_every: int = typer.Option(50, "--save-every", help="Checkpoint every N steps."),
    rank: int = typer.Option(16, "--rank", "-r", help="LoRA rank."),
    alpha: float = typer.Option(32.0, "--alpha", help="LoRA alpha."),
    dropout: float = typer.Option(0.05, "--dropout", help="LoRA dropout."),
    target: list[str] = typer.Option([], "--target", help="LoRA target name pattern "
                                     "(repeatable); default q_proj k_proj v_proj o_proj."),
    merge: str | None = typer.Option(None, "--merge", help="LoRA: merge into a float copy and "
                                     "re-quantize into model/ (the base's scheme and "
                                     "formats) by GPTQ with calibration; or name a recipe "
                                     "(--merge rtn, awq, …). A bare --merge goes after SOURCE."),
    merge_gguf: str | None = typer.Option(None, "--merge-gguf", help="LoRA: also export the "
                                          "merged model as model.gguf of this llama.cpp type "
                                          "(Q4_K_M, Q8_0 …), GPTQ-encoded (rtn with "
                                          "--merge rtn)."),
    calib: str = typer.Option("wiki", "--calib", help="The merge's calibration corpus (its "
                              "second half: the training half, disjoint from evaluation)."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    calib_len: int = typer.Option(512, "--calib-len", help="Tokens per calibration window."),
    lsq_grad_scale: bool = typer.Option(True, "--lsq-grad-scale/--no-lsq-grad-scale",
                                        help="qat/lr-qat: scale the scales' gradient by "
                                        "LSQ's 1/sqrt(N·Qp)."),
    compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto | float32 | "
                                      "bfloat16 (autocast of forward and backward)."),
    seed: int = typer.Option(0, "--seed", help="Seed (init, dropout, data order)."),
    force: bool = typer.Option(False, "--force", help="Start over if OUTPUT exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the run summary as JSON."),
) -> None:
    """Fine-tune SOURCE (LoRA/QLoRA/PRILoRA on the quantized base, QAT or LR-QAT with
    distillation). A stopped run resumes when the same command is run again."""
    from .finetuning.api import finetune as run_finetune

    options: dict[str, Any] = dict(
        scheme=scheme, objective=objective, lr=lr, schedule=schedule, warmup_steps=warmup,
        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, save_every=save_every,
        r=rank, alpha=alpha, dropout=dropout, merge=merge, merge_gguf=merge_gguf, calib=calib,
        calib_samples=calib_samples, calib_len=calib_len, lsq_grad_scale=lsq_grad_scale,
        compute_dtype=compute_dtype, seed=seed)
    if target:
        options["targets"] = tuple(t for item in target for t in item.split(",") if t)
    track, on_step = _finetune_display(quiet or as_json)
    try:
        res = _run(lambda: run_finetune(source, method, data, output, max_steps=max_steps,
                                        max_tokens=max_tokens, teacher=teacher, force=force,
                                        progress=track, on_step=on_step, **options))
    except typer.Exit as e:
        if e.exit_code == 130:
            console.print(f"checkpoint saved in {output}/checkpoint; run the same command to "
                          "resume")
        raise
    if as_json:
        typer.echo(json.dumps(res.summary, default=str))
    elif not quiet:
        t = res.summary.get("train", {})
        console.print(f"[green]done[/] {t.get('steps')} steps, {t.get('tokens'):,} tokens, "
                      f"final loss {t.get('final_loss'):.4f} → {output}")


def _finetune_display(quiet: bool) -> tuple[Any, Any]:
    """A progress bar showing loss, tokens/s and the ETA, fed by the loop's ``on_step``."""
    from rich.progress import TimeRemainingColumn

    state: dict[str, Any] = {}

    def track(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
        if quiet or not console.is_terminal:
            yield from items
            return
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                      console=console, transient=False) as bar:
            state["bar"], state["task"] = bar, bar.add_task(what, total=total, loss="-", tps="-")
            for item in items:
                yield item
                bar.advance(state["task"])

    def on_step(rec: Any) -> None:
        if "bar" in state:
            state["bar"].update(state["task"], loss=f"{rec.loss:.4f}",
                                tps=f"{rec.tokens_per_s:,.0f}")
        elif not quiet and rec.step % 10 == 0:
            console.print(f"step {rec.step}: loss {rec.loss:.4f}, {rec.tokens_per_s:,.0f} "
                          f"tok/s", highlight=False)

    return track, on_step


# --- end finetune ----------------------------------------------------------------------------


#: loggers that warn about their own setup on every start, which a CLI user can do nothing
#: about: torchao's CUDA-only kernels failing to load on a CPU machine, torch's deprecation of
#: pytree registrations that torchao makes at import, bitsandbytes' optional CPU kernels
_SETUP_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu")
#: environment read by the libraries at import: their own progress bars (transformers'
#: "Loading weights", compressed-tensors' "Decompressing model", all tqdm) and log levels
_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
              "TRANSFORMERS_VERBOSITY": "error", "LLM_COMPRESSOR_LOG_LEVEL": "ERROR"}


def configure_process() -> None:
    """Quiet the libraries for the ``edgequant`` command's own process (never for a library
    user: only :func:`main` calls this). Their setup chatter and progress bars are hidden (our
    own progress shows on stderr); their errors still print. Settings a user made in the
    environment win; the fresh processes that measure speed and memory inherit these."""
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in _SETUP_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main() -> None:  # pragma: no cover  (tests run it in a subprocess)
    configure_process()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
