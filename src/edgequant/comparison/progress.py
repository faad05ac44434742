"""Rich progress for a compare run: an overall bar over cells, the current cell's step, and
the inner loop of that step (blocks quantized, windows scored, …); one line per finished cell."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .matrix import Cell
from .runner import Hooks, RunSummary


class RichHooks(Hooks):
    """Progress on ``console`` (a ``rich.console.Console``, stderr by default)."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console or Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=self.console, transient=False)
        self.overall: Any = None
        self.inner: Any = None
        self.cell = ""

    def run_started(self, total: int, todo: int, out_dir: Path) -> None:
        self.console.print(f"compare: {total} cells, {total - todo} already done in "
                           f"{out_dir / 'results.db'}, {todo} to run")
        self.bar.start()
        self.overall = self.bar.add_task("cells", total=total, completed=total - todo)

    def cell_started(self, index: int, total: int, cell: Cell, short: str) -> None:
        self.cell = f"{cell.model} · {cell.label} [{short}]"
        self.bar.update(self.overall, description=f"cell {index + 1}/{total}: {self.cell}")

    def step(self, name: str) -> None:
        self.bar.update(self.overall, description=f"{self.cell}: {name}")

    def cell_finished(self, cell: Cell, status: str, seconds: float, message: str = "") -> None:
        if status == "skipped":
            return
        colour = {"done": "green", "failed": "red"}.get(status, "yellow")
        tail = f" — {message}" if message else ""
        self.console.print(f"[{colour}]{status}[/] {cell.model} · {cell.label} "
                           f"({seconds:.0f} s){tail}", highlight=False)
        if self.overall is not None:
            self.bar.advance(self.overall)

    def track(self, items: Iterable[Any], total: int, what: str) -> Iterator[Any]:
        task = self.bar.add_task(f"  {what}", total=total or None)
        try:
            for item in items:
                yield item
                self.bar.advance(task)
        finally:
            self.bar.remove_task(task)

    def run_finished(self, summary: RunSummary) -> None:
        self.stop()
        self.console.print(f"compare: {len(summary.done)} done, {len(summary.failed)} failed, "
                           f"{len(summary.skipped)} skipped in {summary.seconds:.0f} s")

    def stop(self) -> None:
        self.bar.stop()
