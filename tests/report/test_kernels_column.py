"""The report shows the kernels each speed run recorded, and its caveat says what each kernel
computes and why layers fell back — from the database alone."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from edgequant.comparison.matrix import Settings
from edgequant.comparison.store import ResultRow
from edgequant.report import render_report
from edgequant.report.render import caveats
from edgequant.report.tables import KERNELS_HEADER, kernel_text, parse_markdown_table

RUNTIME = {"dtype": "bfloat16", "device": "cpu", "kernels": {"int4_cpu": 10, "reference": 4},
           "kernel_fallbacks": {"int4_cpu: 32 output rows are not a multiple of 64": 4},
           "kernel_summaries": {"int4_cpu": "fused int4", "reference": "dequantize, matmul"}}


def test_kernel_text():
    assert kernel_text(RUNTIME) == "int4_cpu ×10, reference ×4"
    assert kernel_text(None) == kernel_text({"int4_kernel_layers": 3}) == "–"


def test_the_table_shows_recorded_kernels(tmp_path: Path) -> None:
    from tests.report.conftest import make_db

    out = make_db(tmp_path / "cmp")
    md = render_report(out).read_text()
    assert KERNELS_HEADER not in md  # no run recorded kernels: no column
    db = sqlite3.connect(out / "results.db")
    rid, ev = db.execute("SELECT r.id, r.eval FROM results r JOIN cells c ON c.hash = "
                         "r.cell_hash WHERE c.kind = 'native' ORDER BY r.id LIMIT 1").fetchone()
    ev = json.loads(ev)
    ev["speed"] = {**(ev.get("speed") or {}), "runtime": RUNTIME}
    db.execute("UPDATE results SET eval=? WHERE id=?", (json.dumps(ev), rid))
    db.commit()
    db.close()
    md = render_report(out).read_text()
    rows = parse_markdown_table(md, "cell")
    shown = [r[KERNELS_HEADER] for r in rows]
    assert shown.count("int4_cpu ×10, reference ×4") == 1 and shown.count("–") == len(rows) - 1
    assert "`int4_cpu`: fused int4" in md
    assert "32 output rows are not a multiple of 64 (4 layers in 1 cell)" in md
    assert "dequantizes each weight on every forward pass" not in md
    assert KERNELS_HEADER in (out / "report.html").read_text()


def test_the_native_caveat_without_records_says_what_ran_then():
    row = ResultRow(1, "ab" * 32, 1, "m", "native", "rtn", "w4g128", "edgequant", "rtn w4g128",
                    "e", {}, "", None, {})
    text = "\n".join(caveats([row], Settings()))
    assert "recorded no kernel choice" in text and "fused int4 kernel" in text
    text = "\n".join(caveats([row], Settings(), None, {1: RUNTIME}))
    assert "Layers on `reference` dequantize every weight on every step" in text
