"""A results database made by the real runner over the fake matrix: two models (for the
equal-memory section), one failing cell, layer errors and generations."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgequant.comparison.runner import run
from tests.comparison import fakes


def make_db(out: Path, models: tuple[str, ...] = (fakes.MODEL, "fake-big")) -> Path:
    log = fakes.Log(out.parent / f"{out.name}.log")
    cells = [c for m in models for c in fakes.cells(m)]
    run(cells, out, fakes.SETTINGS, makers=fakes.makers(log, fail={"hqq w4g64-asym"}),
        evaluator=fakes.evaluator(log), preset="quick")
    return out


@pytest.fixture
def report_dir(tmp_path: Path) -> Path:
    from edgequant.report import render_report

    out = make_db(tmp_path / "cmp")
    render_report(out)
    return out
