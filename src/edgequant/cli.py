"""The ``edgequant`` command: a thin shell over the Python API.

It parses arguments, shows progress and prints errors; every decision lives in the library.
User errors (``EdgequantError``) print in one or two lines, no traceback, exit status 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
    try:
        return fn()
    except EdgequantError as e:
        _fail(e)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None


def _progress_fn(quiet: bool) -> Callable[[Iterable[Any], int, str], Iterable[Any]]:
    def track(items: Iterable[Any], total: int, what: str) -> Iterable[Any]:
        if quiet or not sys.stderr.isatty() and total < 1:
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
    method: str = typer.Option("rtn", "--method", "-m", help="Quantization method."),
    scheme: str = typer.Option("w4g128", "--scheme", "-s", help="Scheme short name, e.g. "
                               "w4g128, w3g128-asym, w8, nf4, fp8."),
    override: list[str] = typer.Option([], "--override", help="PATTERN=SCHEME (or "
                                       "PATTERN=keep), e.g. 'lm_head=w8' or '*.down_proj=w8'."),
    keep_dtype: str = typer.Option("float16", help="dtype for unquantized tensors."),
    option: list[str] = typer.Option([], "--set", help="Method option KEY=VALUE, e.g. "
                                     "'act_order=true' or 'damp=0.02' (see the method's config)."),
    calib: str = typer.Option("wiki", "--calib", help="Calibration corpus (wiki, lambada, "
                              "shakespeare) or a text file; only for methods that need data."),
    calib_samples: int = typer.Option(128, "--calib-samples", help="Calibration windows."),
    calib_len: int = typer.Option(512, "--calib-len", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Quantize SOURCE and save a native artifact."""
    from . import load
    from .data.calibration import calibration
    from .io_utils import check_output
    from .nn.recipe import Recipe
    from .pipeline import quantize_model

    def go() -> dict[str, Any]:
        from .formats import QuantScheme

        check_output(output, force)
        recipe = Recipe(method=method.lower(), scheme=QuantScheme.parse(scheme),
                        overrides=tuple(_pairs(override, "--override", "PATTERN=SCHEME")),
                        keep_dtype=keep_dtype,
                        method_options={k: _literal(v) for k, v in
                                        _pairs(option, "--set", "KEY=VALUE")})
        if not quiet:
            console.print(f"loading {source} …")
        model = load(source)
        q = quantize_model(model, recipe, calib=calibration(calib, calib_samples, calib_len, seed),
                           inplace=True, progress=_progress_fn(quiet))
        q.save(output, force=force)
        return _info_dict(output)

    info = _run(go)
    if as_json:
        out.print_json(json.dumps(_public(info)))
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


def _literal(text: str) -> Any:
    """'true' → True, '0.02' → 0.02, '128' → 128, anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _info_dict(path: Path) -> dict[str, Any]:
    from . import load
    from .models.artifact import WEIGHTS

    model = load(path)
    summary = model.summary()
    weights = Path(path) / WEIGHTS
    summary["size_bytes"] = weights.stat().st_size if weights.exists() else None
    summary["dir_bytes"] = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) \
        if Path(path).is_dir() else None
    summary["source"] = model.source
    summary["recipe"] = model.recipe.to_dict() if model.recipe else None
    return summary


def _public(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items()}


def _print_info(info: dict[str, Any]) -> None:
    table = Table(title="quantized layers", show_lines=False)
    for col in ("layer", "scheme", "shape", "bits/weight", "bytes"):
        table.add_column(col, justify="right" if col in ("bits/weight", "bytes") else "left")
    for name, rec in info["layers"].items():
        table.add_row(name, rec["scheme"], "×".join(map(str, rec["shape"])),
                      f"{rec['bits_per_weight']:.3f}", f"{rec['nbytes']:,}")
    out.print(table)
    bpw = info["bits_per_weight"]
    out.print(f"parameters: {info['num_params']:,}   quantized layers: "
              f"{info['quantized_layers']}   bits/weight (quantized layers): "
              f"{bpw:.4f}" if bpw else "-")
    out.print(f"bits/weight (whole model): {info['bits_per_weight_total']:.4f}   "
              f"weights on disk: {info['size_bytes'] or 0:,} bytes")


@app.command()
def info(
    artifact: Path = typer.Argument(..., help="A native artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per-layer schemes, bits per weight and sizes of an artifact."""
    summary = _run(lambda: _info_dict(artifact))
    if as_json:
        out.print_json(json.dumps(_public(summary)))
    else:
        _print_info(summary)


@zoo_app.command("list")
def zoo_list(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The models the zoo knows, and whether they are cached."""
    from .models import zoo

    entries = zoo.list_models()
    if as_json:
        out.print_json(json.dumps(entries, default=str))
        return
    table = Table()
    for col in ("name", "description", "cached"):
        table.add_column(col)
    for e in entries:
        table.add_row(e["name"], e.get("description", ""), "yes" if e.get("cached") else "no")
    out.print(table)


@zoo_app.command("pull")
def zoo_pull(name: str = typer.Argument(..., help="Zoo model name.")) -> None:
    """Fetch, verify and convert a zoo model into the cache."""
    from .models import zoo

    path = _run(lambda: zoo.pull(name))
    out.print(str(path))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
