"""The report's tables, as plain rows of strings (rendered to Markdown and HTML elsewhere).

Every number in the main table is ``metrics.value`` of one row of ``results.db`` — the latest
result of the cell named in the ``cell`` column — times the column's ``scale``, rounded to its
``decimals``. :data:`COLUMNS` is that mapping; a test parses the written Markdown and checks
each number against the database through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..comparison.store import ResultRow

MISSING = "–"


@dataclass(frozen=True)
class Column:
    """A table column: a text field of the row, or a metric times ``scale`` to ``decimals``."""

    header: str
    metric: str | None = None
    scale: float = 1.0
    decimals: int = 2
    field: str | None = None

    def cell(self, row: ResultRow) -> str:
        if self.field is not None:
            return str(getattr(row, self.field))
        assert self.metric is not None
        return fmt(row.m(self.metric), self.scale, self.decimals)


def fmt(value: float | None, scale: float = 1.0, decimals: int = 2) -> str:
    """``value × scale`` with ``decimals`` digits and thousands separators; ``–`` if None."""
    if value is None:
        return MISSING
    v = value * scale
    if v != v:  # NaN
        return "nan"
    return f"{v:,.{decimals}f}"


def parse_number(text: str) -> float | None:
    """The inverse of :func:`fmt` (for tests and tools): ``"1,234.5"`` → 1234.5."""
    t = text.strip()
    if t == MISSING:
        return None
    return float(t.replace(",", ""))


COLUMNS: tuple[Column, ...] = (
    Column("cell", field="short"),
    Column("model", field="model"),
    Column("method", field="method"),
    Column("tool", field="tool"),
    Column("scheme", field="scheme"),
    Column("bits/weight", "bits_per_weight", decimals=3),
    Column("size MB", "size_mb", decimals=1),
    Column("peak RSS MB", "peak_rss_mb", decimals=0),
    Column("prefill tok/s", "prefill_tps", decimals=2),
    Column("decode tok/s", "decode_tps", decimals=2),
    Column("PPL", "ppl", decimals=3),
    Column("KLD", "kld_mean", decimals=4),
    Column("top-1 %", "top1", scale=100.0, decimals=1),
    Column("task acc %", "task_acc", scale=100.0, decimals=1),
)


def sort_rows(rows: Iterable[ResultRow], models: Sequence[str] | None = None) -> list[ResultRow]:
    """Per model (in ``models`` order, else first appearance): baseline first, then by size
    (largest first), then label."""
    rows = list(rows)
    order = list(models) if models else list(dict.fromkeys(r.model for r in rows))

    def key(r: ResultRow) -> tuple[int, int, float, str]:
        size = r.m("size_mb")
        return (order.index(r.model) if r.model in order else len(order),
                0 if r.kind == "baseline" else 1, -(size if size is not None else -1.0),
                r.label)
    return sorted(rows, key=key)


KERNELS_HEADER = "kernels (speed run)"


def kernel_text(runtime: Mapping[str, Any] | None) -> str:
    """The kernels a speed run recorded (``runtime["kernels"]``: layers per kernel), as
    ``int4_cpu ×168, reference ×43``; ``–`` when it recorded none (another backend, or an
    edgequant from before the kernel registry)."""
    counts = (runtime or {}).get("kernels")
    if not counts:
        return MISSING
    return ", ".join(f"{name} ×{n}" for name, n in counts.items())


def main_table(rows: Sequence[ResultRow], kernels: Mapping[int, str] | None = None
               ) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells of the comparison table (``rows`` already sorted); with
    ``kernels`` (result id → :func:`kernel_text`), a last column of the kernels that ran."""
    headers = [c.header for c in COLUMNS]
    body = [[c.cell(r) for c in COLUMNS] for r in rows]
    if kernels:
        headers.append(KERNELS_HEADER)
        for r, cells in zip(rows, body, strict=True):
            cells.append(kernels.get(r.result_id, MISSING))
    return headers, body


def markdown(headers: Sequence[str], body: Sequence[Sequence[str]],
             numeric: Sequence[bool] | None = None) -> str:
    """A GitHub-flavoured Markdown table (``|`` in cells escaped)."""
    numeric = numeric or [False] * len(headers)

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(h) for h in headers) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def numeric_columns(kernels: bool = False) -> list[bool]:
    return [c.metric is not None for c in COLUMNS] + ([False] if kernels else [])


def parse_markdown_table(text: str, header_first: str = "cell") -> list[dict[str, str]]:
    """The rows of the first Markdown table in ``text`` whose first header is
    ``header_first``, as dicts keyed by header."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = _split(line)
        if cells and cells[0] == header_first and i + 1 < len(lines) \
                and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            out = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                out.append(dict(zip(cells, _split(row), strict=True)))
            return out
    return []


def _split(line: str) -> list[str]:
    line = line.strip()
    if not line.startswith("|"):
        return []
    parts, cur, esc = [], "", False
    for ch in line[1:]:
        if esc:
            cur += ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == "|":
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts
