"""Comparison (``eq.compare``): the experiment matrix, the results store, a resuming runner.

    import edgequant as eq
    res = eq.compare("smollm2-135m", preset="quick", out_dir="out/compare")
    res.report            # out/compare/report.md (and report.html, plots/*.png)

See :mod:`.matrix` (cells, presets, settings), :mod:`.store` (``results.db``) and
:mod:`.runner` (making, evaluating, resuming).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .matrix import Cell, MatrixError, Settings, build, parse_methods, preset
from .runner import Hooks, RunSummary, run
from .store import Store

__all__ = ["Cell", "CompareResult", "Hooks", "MatrixError", "RunSummary", "Settings", "Store",
           "compare", "plan"]

#: tasks turned on by ``limit`` alone in a preset that runs none
DEFAULT_TASKS = ("arc_easy", "hellaswag")


@dataclass
class CompareResult:
    """A finished (or resumed) compare: the run's summary and the report it wrote."""

    summary: RunSummary
    out_dir: Path
    report: Path | None


def plan(sources: Sequence[str] = (), preset_name: str = "quick",
         methods: str | Sequence[str] | None = None, **settings: Any
         ) -> tuple[list[Cell], Settings]:
    """The cells and settings a compare would run (nothing is made).

    ``settings`` override single :class:`Settings` fields (``max_tokens=8192``); ``limit``
    without ``tasks`` in a preset without tasks turns on :data:`DEFAULT_TASKS`.
    """
    p = preset(preset_name)
    items = parse_methods(methods) if methods else None
    cells = build(tuple(sources), items, preset_name)
    names = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(settings) - names
    if unknown:
        raise MatrixError(f"unknown compare setting(s) {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(sorted(names))}")
    given = {k: v for k, v in settings.items() if v is not None}
    if isinstance(given.get("tasks"), str):
        given["tasks"] = tuple(t for t in given["tasks"].split(",") if t)
    if "limit" in given and "tasks" not in given and not p.settings.tasks:
        given["tasks"] = DEFAULT_TASKS
    return cells, dataclasses.replace(p.settings, **given)


def compare(*sources: str, preset: str = "quick", methods: str | Sequence[str] | None = None,
            out_dir: str | Path = "out/compare", force: bool = False, report: bool = True,
            hooks: Hooks | None = None, argv: list[str] | None = None,
            **settings: Any) -> CompareResult:
    """Quantize ``sources`` (zoo names, HF folders, …; default ``smollm2-135m``) by every
    method of a preset (or ``methods``), measure every result the same way, store it in
    ``out_dir/results.db`` and write the report.

    Finished cells are skipped, so an interrupted compare resumes; a failing cell is recorded
    and the rest go on.

    Args:
        preset: ``quick`` | ``paper`` | ``full`` (:func:`.matrix.preset`).
        methods: instead of the preset's items: ``"gptq:w4g128,gguf:Q4_K_M,bnb-nf4"``.
        force: redo finished cells.
        report: write ``report.md``/``report.html`` and plots after the run.
        hooks: progress callbacks (``comparison.progress.RichHooks`` for a terminal).
        settings: :class:`Settings` fields, e.g. ``max_tokens=8192``, ``tasks="arc_easy"``,
            ``limit=100``.
    """
    cells, s = plan(sources, preset, methods, **settings)
    summary = run(cells, out_dir, s, hooks=hooks, force=force, preset=preset, argv=argv)
    path = None
    if report:
        from ..report import render_report

        path = render_report(out_dir)
    return CompareResult(summary, Path(out_dir), path)
