"""End to end on the zoo's real model through the CLI (slow): a small matrix with our RTN
artifact and our GGUF export, measured, stored, reported — and a re-run that skips it all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_compare_cli_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgequant.cli import app
    from edgequant.comparison.store import Store
    from edgequant.report.tables import parse_markdown_table

    out = tmp_path / "cmp"
    args = ["compare", "smollm2-135m", "--methods", "rtn:w4g128,gguf:Q8_0", "-o", str(out),
            "--max-tokens", "1024", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["status"] == "done" and len(summary["done"]) == 3 and not summary["failed"]
    table = {r["method"] + " " + r["scheme"]: r
             for r in parse_markdown_table((out / "report.md").read_text())}
    assert set(table) == {"baseline fp32", "rtn w4g128", "gguf Q8_0"}
    assert float(table["baseline fp32"]["KLD"]) == 0.0
    assert 0 < float(table["gguf Q8_0"]["KLD"]) < float(table["rtn w4g128"]["KLD"]) < 1.0
    assert 8.4 < float(table["gguf Q8_0"]["bits/weight"]) < 8.6
    assert 15 < float(table["baseline fp32"]["PPL"]) < 40  # 27.2 on the first 1024 tokens
    with Store(out) as s:
        rows = {r.label: r for r in s.results()}
        errs = s.result_layer_errors(rows["rtn w4g128"].result_id)
        assert len(errs) == 30 * 7 and all(0.02 < e["rel_error"] < 0.3 for e in errs)
    md = (out / "report.md").read_text()
    assert "channel-permuted with seed 0" in md and "576" in md
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert len(json.loads(again.output.strip().splitlines()[-1])["skipped"]) == 3
