"""The report: every number in its table traces to a row of results.db; plots, failures,
recommendations, equal-memory pairing and caveats are there; it regenerates from the DB."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edgequant.comparison.store import ResultRow, Store, StoreError
from edgequant.report import render_report
from edgequant.report.render import caveats
from edgequant.report.tables import COLUMNS, fmt, parse_markdown_table, parse_number


def _latest_result(db: sqlite3.Connection, prefix: str) -> int:
    rows = db.execute("SELECT DISTINCT cell_hash FROM results WHERE cell_hash LIKE ?",
                      (prefix + "%",)).fetchall()
    assert len(rows) == 1, f"cell prefix {prefix} is ambiguous or unknown: {rows}"
    return db.execute("SELECT MAX(id) FROM results WHERE cell_hash=?", rows[0]).fetchone()[0]


def test_every_number_in_the_table_is_a_db_row(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    table = parse_markdown_table(md, "cell")
    db = sqlite3.connect(report_dir / "results.db")
    n_done = db.execute("SELECT COUNT(DISTINCT cell_hash) FROM results").fetchone()[0]
    assert len(table) == n_done == 8  # 2 models × 5 cells, one failing in each
    checked = 0
    for row in table:
        rid = _latest_result(db, row["cell"])
        cell = db.execute("SELECT c.model, c.method, c.tool, c.scheme FROM results r JOIN cells "
                          "c ON c.hash = r.cell_hash WHERE r.id=?", (rid,)).fetchone()
        assert (row["model"], row["method"], row["tool"], row["scheme"]) == tuple(cell)
        for col in COLUMNS:
            if col.metric is None:
                continue
            value = db.execute("SELECT value FROM metrics WHERE result_id=? AND name=?",
                               (rid, col.metric)).fetchone()
            assert value is not None, f"{col.metric} of result {rid} is not in the DB"
            assert row[col.header] == fmt(value[0], col.scale, col.decimals), (row, col)
            if value[0] is not None:  # and the text reads back as that number
                assert parse_number(row[col.header]) == pytest.approx(
                    value[0] * col.scale, abs=10 ** -col.decimals)
            checked += 1
    assert checked == 8 * sum(c.metric is not None for c in COLUMNS)


def test_report_sections_and_plots(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    html = (report_dir / "report.html").read_text()
    for section in ("## Results", "### Failed cells", "## Recommendations",
                    "## Models at equal memory", "## Plots", "## Sample generations",
                    "## Caveats"):
        assert section in md
    assert md.count("injected failure") == 2 and "RuntimeError" in md
    pngs = sorted(p.name for p in (report_dir / "plots").glob("*.png"))
    assert pngs == ["layer_error_fake-big.png", "layer_error_fake-model.png", "size_vs_bpb.png",
                    "size_vs_kld.png", "size_vs_ppl.png", "speed.png"]
    for name in pngs:
        data = (report_dir / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"plots/{name}" in md and f'src="plots/{name}"' in html
    assert "smallest with PPL within 1% of the baseline" in md
    assert "rtn w4g128 says 0 \\| ok" in md and "baseline fp32 says 1" in md
    assert "rows are compared by **measured** bits per weight".lower() in md.lower()


def test_recommendations_name_existing_cells(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text()
    section = md.split("## Recommendations")[1].split("## ")[0]
    with Store(report_dir) as s:
        shorts = {r.short for r in s.results()}
    named = [line.split("`")[1] for line in section.splitlines() if line.count("`") >= 2]
    assert named and set(named) <= shorts


def test_regenerates_from_the_db_alone(report_dir: Path) -> None:
    from typer.testing import CliRunner

    from edgequant.cli import app

    assert oct((report_dir / "report.md").stat().st_mode & 0o777) == "0o644"
    before = parse_markdown_table((report_dir / "report.md").read_text())
    for f in ("report.md", "report.html"):
        (report_dir / f).unlink()
    for p in (report_dir / "plots").glob("*.png"):
        p.unlink()
    res = CliRunner().invoke(app, ["report", str(report_dir)])
    assert res.exit_code == 0, res.output
    assert parse_markdown_table((report_dir / "report.md").read_text()) == before
    assert (report_dir / "report.html").is_file() and (report_dir / "plots/speed.png").is_file()


def test_report_of_a_missing_db_is_a_clear_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgequant.cli import app

    with pytest.raises(StoreError, match="does not exist"):
        render_report(tmp_path)
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_only_cells_measured_alike_are_compared(tmp_path: Path) -> None:
    from edgequant.comparison.matrix import Settings
    from edgequant.comparison.runner import run
    from tests.comparison import fakes
    from tests.report.conftest import make_db

    out = make_db(tmp_path / "cmp", models=(fakes.MODEL,))
    other = Settings(**{**fakes.SETTINGS.to_dict(), "max_tokens": 2048, "tasks": (),
                        "budgets_mb": None})
    log = fakes.Log(tmp_path / "log2")
    run(fakes.cells()[:2], out, other, makers=fakes.makers(log), evaluator=fakes.evaluator(log))
    md = render_report(out).read_text()
    assert len(parse_markdown_table(md)) == 2  # the latest run's settings
    assert "4 finished cell(s) measured with other evaluation settings" in md
    assert "2048 tokens" in md


def _row(model: str, kind: str = "native") -> ResultRow:
    return ResultRow(1, "ab" * 32, 1, model, kind, "rtn", "w4g128", "edgequant", "rtn w4g128",
                     "e", {}, "", None, {})


def test_caveats_name_the_zoo_permutation_and_llama_cpp_fallback() -> None:
    from edgequant.comparison.matrix import Settings

    rows = [_row("smollm2-135m"), _row("smollm2-135m-asis"),
            ResultRow(2, "cd" * 32, 1, "smollm2-135m", "gguf", "gguf", "Q4_K_M", "edgequant",
                      "gguf Q4_K_M", "e", {}, "", None, {})]
    text = "\n".join(caveats(rows, Settings()))
    assert "4-bit GGUF" in text and "channel-permuted with seed 0" in text
    assert "`smollm2-135m-asis`" in text and "**not** permuted" in text
    assert "576" in text and "falls back" in text
    assert "measured** bits per weight" in text
    assert "AWQ/SmoothQuant" not in text
    awq = ResultRow(3, "ef" * 32, 1, "m", "native", "awq", "w4g128", "edgequant", "awq w4g128",
                    "e", {}, "", None, {})
    assert any("AWQ/SmoothQuant" in c for c in caveats([awq], Settings()))


def test_a_busy_machine_is_a_caveat() -> None:
    from edgequant.comparison.matrix import Settings

    busy = caveats([_row("m")], Settings(), {"loadavg": [9.5, 9, 9], "cpus": 2})
    idle = caveats([_row("m")], Settings(), {"loadavg": [0.5, 1, 1], "cpus": 2})
    assert any("machine was busy" in c and "9.5" in c for c in busy)
    assert not any("busy" in c for c in idle)


def test_html_shows_no_raw_markdown(report_dir: Path) -> None:
    """The HTML renders the report's inline Markdown (status **done**, `cell` names in the
    recommendations, setup and equal-memory table) instead of printing its marks."""
    from html.parser import HTMLParser

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.chunks: list[str] = []
            self.skip = 0

        def handle_starttag(self, tag: str, attrs: object) -> None:
            self.skip += tag in ("style", "title")

        def handle_endtag(self, tag: str) -> None:
            self.skip -= tag in ("style", "title")

        def handle_data(self, data: str) -> None:
            if not self.skip:
                self.chunks.append(data)

    html = (report_dir / "report.html").read_text()
    parser = Text()
    parser.feed(html)
    text = "".join(parser.chunks)
    assert "**" not in text and "`" not in text, [line for line in text.splitlines()
                                                   if "**" in line or "`" in line]
    assert "status <strong>done</strong>" in html
    md = (report_dir / "report.md").read_text()
    short = md.split("## Recommendations")[1].split("`")[1]  # the first recommended cell
    assert f"<code>{short}</code>" in html.split("<h2>Recommendations</h2>")[1]
