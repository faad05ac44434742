"""The runner over a fake matrix: storing, skipping finished cells, resuming after an
interrupt or a SIGKILL, and recording a failing backend while the rest completes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgequant.comparison.matrix import Settings, cell_hash
from edgequant.comparison.runner import CompareBusyError, dir_lock, run, source_fingerprint
from edgequant.comparison.store import Store

from . import fakes

REPO = Path(__file__).resolve().parents[2]


def _run(out: Path, log: fakes.Log, **kw):
    ev = kw.pop("evaluator", None) or fakes.evaluator(log)
    return run(kw.pop("cells", None) or fakes.cells(), out, kw.pop("settings", fakes.SETTINGS),
               makers=fakes.makers(log, kw.pop("fail", set())), evaluator=ev, **kw)


def test_run_stores_every_cell_in_one_db(tmp_path: Path) -> None:
    log = fakes.Log(tmp_path / "log.jsonl")
    summary = _run(tmp_path / "out", log, preset="quick", argv=["compare"])
    assert summary.status == "done" and len(summary.done) == 5 and not summary.failed
    with Store(tmp_path / "out") as s:
        assert s.count("results") == 5 and s.count("cells") == 5 and s.count("artifacts") == 5
        run_row = s.runs()[-1]
        assert run_row["status"] == "done" and run_row["finished"]
        assert run_row["host"]["cpus"] >= 1 and "torch" in run_row["versions"]
        assert run_row["settings"]["max_tokens"] == 1024
        rows = {r.label: r for r in s.results()}
        assert rows["rtn w4g128"].m("size_mb") == pytest.approx(
            rows["rtn w4g128"].m("size_bytes") / 1e6)
        assert rows["rtn w4g128"].m("task:arc_easy:acc") is not None
        assert rows["baseline fp32"].m("kld_mean") == 0.0
        # per-layer errors travel with the artifact; generations and timings with the result
        assert s.result_layer_errors(rows["rtn w3g128"].result_id)
        assert len(s.generations(rows["rtn w3g128"].result_id)) == 2
        assert "make" in s.timings(rows["rtn w3g128"].result_id)


def test_rerun_skips_finished_cells(tmp_path: Path) -> None:
    log = fakes.Log(tmp_path / "log.jsonl")
    _run(tmp_path / "out", log)
    again = _run(tmp_path / "out", log)
    assert len(again.skipped) == 5 and not again.done
    assert all(log.count("make", c.label) == 1 for c in fakes.cells())
    forced = _run(tmp_path / "out", log, force=True)
    assert len(forced.done) == 5 and log.count("make", "rtn w4g128") == 2


def test_interrupt_then_resume_does_not_redo_finished_cells(tmp_path: Path) -> None:
    log = fakes.Log(tmp_path / "log.jsonl")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "out", log, evaluator=fakes.evaluator(log, interrupt_at="rtn w3g128"))
    with Store(tmp_path / "out") as s:
        assert s.count("results") == 2  # baseline and rtn w4g128 committed
        assert s.runs()[-1]["status"] == "interrupted"
    resumed = _run(tmp_path / "out", log)
    assert len(resumed.skipped) == 2 and len(resumed.done) == 3
    for c in fakes.cells():
        assert log.count("evaluate", c.label) == 1, c.label
        # the artifact made before the interrupt is reused, not made again
        assert log.count("make", c.label) == 1, c.label


_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from edgequant.comparison.runner import run
from tests.comparison import fakes
log = fakes.Log(Path({log!r}))
run(fakes.cells(), {out!r}, fakes.SETTINGS, makers=fakes.makers(log),
    evaluator=fakes.evaluator(log, sleep=1.5))
"""


def test_sigkill_midway_then_resume(tmp_path: Path) -> None:
    out, logf = tmp_path / "out", tmp_path / "log.jsonl"
    code = textwrap.dedent(_CHILD.format(repo=str(REPO), log=str(logf), out=str(out)))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "results.db").exists():
                with sqlite3.connect(out / "results.db", timeout=30) as db:
                    try:
                        done = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
                    except sqlite3.OperationalError:
                        done = 0
                if done >= 1:
                    break
            time.sleep(0.05)
        assert done >= 1, "the child never committed a cell"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    log = fakes.Log(logf)
    with Store(out) as s:
        committed = {r.label for r in s.results()}
    assert 1 <= len(committed) < 5
    before = {c.label: log.count("evaluate", c.label) for c in fakes.cells()}
    resumed = _run(out, log)  # the lock died with the child
    assert len(resumed.skipped) == len(committed)
    for c in fakes.cells():
        if c.label in committed:
            assert log.count("evaluate", c.label) == before[c.label] == 1, c.label
        else:
            assert log.count("evaluate", c.label) == before[c.label] + 1, c.label
    with Store(out) as s:
        assert s.count("results") == 5
        assert [r["status"] for r in s.runs()] == ["killed", "done"]


def test_failing_backend_is_recorded_and_the_rest_completes(tmp_path: Path) -> None:
    log = fakes.Log(tmp_path / "log.jsonl")
    summary = _run(tmp_path / "out", log, fail={"rtn w3g128"})
    assert summary.status == "done" and len(summary.done) == 4 and len(summary.failed) == 1
    with Store(tmp_path / "out") as s:
        (err,) = s.open_errors()
        assert err.label == "rtn w3g128" and err.step == "make" and err.type == "RuntimeError"
        assert "injected failure" in err.message
        assert "Traceback (most recent call last)" in err.traceback and "fakes.py" in err.traceback
        assert {r.label for r in s.results()} == {c.label for c in fakes.cells()} - {"rtn w3g128"}
    # a re-run retries the failed cell only; once it succeeds its error is no longer open
    again = _run(tmp_path / "out", log)
    assert len(again.done) == 1 and len(again.skipped) == 4
    assert log.count("make", "rtn w3g128") == 2
    with Store(tmp_path / "out") as s:
        assert not s.open_errors() and s.count("errors") == 1


def test_evaluation_failure_is_recorded_with_its_step(tmp_path: Path) -> None:
    log = fakes.Log(tmp_path / "log.jsonl")
    inner = fakes.evaluator(log)

    def bad(made, ctx):
        if ctx.cell.label == "hqq w4g64-asym":
            raise ValueError("evaluation blew up")
        return inner(made, ctx)
    summary = _run(tmp_path / "out", log, evaluator=bad)
    assert len(summary.failed) == 1
    with Store(tmp_path / "out") as s:
        (err,) = s.open_errors()
        assert err.step == "evaluate" and err.type == "ValueError"
        assert s.count("results") == 4 and s.count("artifacts") == 5  # the artifact is kept


def test_a_failed_speed_test_keeps_the_rest_of_the_cell(tmp_path: Path) -> None:
    from edgequant.report import render_report
    from edgequant.report.tables import parse_markdown_table

    log = fakes.Log(tmp_path / "log.jsonl")
    summary = _run(tmp_path / "out", log,
                   evaluator=fakes.evaluator(log, no_speed_at="rtn w3g128"))
    assert len(summary.done) == 5 and not summary.failed
    with Store(tmp_path / "out") as s:
        assert not s.open_errors()
        (inc,) = s.incomplete()
        assert inc.label == "rtn w3g128" and inc.step == "evaluate:speed"
        assert "over 1800 s" in inc.message and "TimeoutError" in inc.type
        row = next(r for r in s.results() if r.label == "rtn w3g128")
        assert row.m("ppl") is not None and row.m("decode_tps") is None
    md = render_report(tmp_path / "out").read_text()
    assert "### Incomplete measurements" in md and "evaluate:speed" in md
    table = {r["method"] + " " + r["scheme"]: r for r in parse_markdown_table(md)}
    assert table["rtn w3g128"]["decode tok/s"] == "–" and table["rtn w3g128"]["PPL"] != "–"
    # a re-run does not retry it: the cell is done (--force redoes it)
    assert len(_run(tmp_path / "out", log).skipped) == 5


def test_changed_settings_make_new_cells(tmp_path: Path) -> None:
    log = fakes.Log(tmp_path / "log.jsonl")
    _run(tmp_path / "out", log)
    # calibration settings only matter to calibrated cells (gptq here)
    calib = Settings(**{**fakes.SETTINGS.to_dict(), "calib_samples": 4, "tasks": (),
                        "budgets_mb": None})
    again = _run(tmp_path / "out", log, settings=calib)
    assert [log.count("evaluate", c.label) for c in fakes.cells()] == [1, 1, 1, 1, 2]
    assert len(again.done) == 1
    # an evaluation setting changes every cell
    ctx = Settings(**{**fakes.SETTINGS.to_dict(), "max_tokens": 2048, "tasks": (),
                      "budgets_mb": None})
    third = _run(tmp_path / "out", log, settings=ctx)
    assert len(third.done) == 5


def test_one_compare_per_directory(tmp_path: Path) -> None:
    with dir_lock(tmp_path), pytest.raises(CompareBusyError, match="another edgequant compare"), \
            dir_lock(tmp_path):
        pass


def test_cell_hash_is_stable() -> None:
    """The hash of a cell must not change between versions without HASH_VERSION changing:
    a changed hash orphans every stored result."""
    cell = fakes.cells()[1]
    fp = source_fingerprint("fake-model")
    assert fp == "id:fake-model"
    s = Settings(corpus="wiki", ctx=512, max_tokens=4096, kld_topk=256, tasks=("arc_easy",),
                 limit=50, task_seed=1234, prompt_tokens=128, new_tokens=32, speed_runs=3,
                 warmup=1, threads=None, generate_prompts=3, generate_tokens=24)
    h = cell_hash(cell, s, fp)
    assert h == cell_hash(cell, s, fp) and len(h) == 64
    assert h == "307ff054d388ba9bf556caf7c4ee853771e0e5a64bf81c3047984bd6446d0490"
