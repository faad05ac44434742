"""The results store: one SQLite file (``DIR/results.db``) that a report is made from alone.

Tables (every write is one transaction; a cell is *done* exactly when its ``results`` row
and its metrics were committed together):

============  =================================================================================
runs          one row per ``compare`` invocation: started, finished, status (running | done |
              interrupted | failed), preset, argv, host info, library versions, settings
cells         one row per cell hash: model, kind, method, scheme, tool, label, ``eval_hash``
              (cells are compared only with cells measured the same way), the full config
artifacts     a made artifact: cell, run, path, make seconds, what the maker reported (committed
              when the make step ends, so a resumed run reuses the artifact instead of
              re-making it)
layer_errors  per quantized layer of an artifact: ‖W − Ŵ‖ / ‖W‖ against the source
results       a finished cell: run, artifact, start/finish time, the full evaluation as JSON
metrics       one row per number of a result (``ppl``, ``kld_mean``, ``size_bytes``, …):
              every number in a report is one of these rows
timings       seconds per step of a result (make, evaluate, and the evaluation's own steps)
generations   the sample generations of a result
errors        a failed cell: run, step, exception type, message and the full traceback
============  =================================================================================
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import sqlite3
import traceback as _tb
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgequantError

DB_NAME = "results.db"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started TEXT NOT NULL, finished TEXT, status TEXT NOT NULL,
    preset TEXT, argv TEXT, host TEXT, versions TEXT, settings TEXT);
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY, model TEXT NOT NULL, kind TEXT NOT NULL, method TEXT NOT NULL,
    scheme TEXT NOT NULL, tool TEXT NOT NULL, label TEXT NOT NULL, eval_hash TEXT NOT NULL,
    config TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    id INTEGER PRIMARY KEY, cell_hash TEXT NOT NULL REFERENCES cells(hash),
    run_id INTEGER NOT NULL REFERENCES runs(id), path TEXT NOT NULL, make_s REAL,
    info TEXT, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layer_errors (
    artifact_id INTEGER NOT NULL REFERENCES artifacts(id), layer TEXT NOT NULL,
    block INTEGER, role TEXT, rel_error REAL NOT NULL, numel INTEGER,
    PRIMARY KEY (artifact_id, layer));
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY, cell_hash TEXT NOT NULL REFERENCES cells(hash),
    run_id INTEGER NOT NULL REFERENCES runs(id), artifact_id INTEGER REFERENCES artifacts(id),
    started TEXT NOT NULL, finished TEXT NOT NULL, eval TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    result_id INTEGER NOT NULL REFERENCES results(id), name TEXT NOT NULL, value REAL,
    PRIMARY KEY (result_id, name));
CREATE TABLE IF NOT EXISTS timings (
    result_id INTEGER NOT NULL REFERENCES results(id), step TEXT NOT NULL, seconds REAL,
    PRIMARY KEY (result_id, step));
CREATE TABLE IF NOT EXISTS generations (
    result_id INTEGER NOT NULL REFERENCES results(id), idx INTEGER NOT NULL, prompt TEXT,
    output TEXT, PRIMARY KEY (result_id, idx));
CREATE TABLE IF NOT EXISTS errors (
    id INTEGER PRIMARY KEY, cell_hash TEXT NOT NULL REFERENCES cells(hash),
    run_id INTEGER NOT NULL REFERENCES runs(id), step TEXT NOT NULL, type TEXT NOT NULL,
    message TEXT NOT NULL, traceback TEXT NOT NULL, at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS results_cell ON results(cell_hash);
CREATE INDEX IF NOT EXISTS errors_cell ON errors(cell_hash);
"""


class StoreError(EdgequantError):
    """A results database that is missing, from another schema version, or unreadable."""


def now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class ResultRow:
    """A finished cell as the report reads it (the latest result of its cell)."""

    result_id: int
    cell_hash: str
    run_id: int
    model: str
    kind: str
    method: str
    scheme: str
    tool: str
    label: str
    eval_hash: str
    config: dict[str, Any]
    finished: str
    artifact: str | None
    metrics: dict[str, float | None] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.cell_hash[:8]

    def m(self, name: str) -> float | None:
        return self.metrics.get(name)


@dataclass
class ErrorRow:
    cell_hash: str
    run_id: int
    model: str
    label: str
    tool: str
    step: str
    type: str
    message: str
    traceback: str
    at: str


class Store:
    """``DIR/results.db``. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        path = Path(path)
        if path.is_dir() or path.suffix != ".db":
            path = path / DB_NAME
        if not create and not path.is_file():
            raise StoreError(f"{path} does not exist; run `edgequant compare -o "
                             f"{path.parent}` first")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.execute("PRAGMA synchronous = FULL")
        try:
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise StoreError(f"{path} is not a readable results database ({e})") from None

    def _migrate(self) -> None:
        with self.transaction():
            # one statement at a time: executescript would commit on its own
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self.db.execute(stmt)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise StoreError(f"{self.path} has schema version {row[0]}; this edgequant "
                                 f"reads version {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT (ROLLBACK on any exception, KeyboardInterrupt too)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- runs -------------------------------------------------------------------------------

    def start_run(self, preset: str | None, argv: list[str] | None, host: dict[str, Any],
                  versions: dict[str, Any], settings: dict[str, Any]) -> int:
        """A new run. Runs still marked ``running`` were killed (the caller holds the
        directory's lock, so none is alive): they become ``killed``."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status='killed' WHERE status='running'")
            cur = db.execute(
                "INSERT INTO runs (started, status, preset, argv, host, versions, settings) "
                "VALUES (?, 'running', ?, ?, ?, ?, ?)",
                (now(), preset, _j(argv), _j(host), _j(versions), _j(settings)))
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, status: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE runs SET finished=?, status=? WHERE id=?", (now(), status, run_id))

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM runs ORDER BY id").fetchall()
        return [{**dict(r), **{k: _uj(r[k]) for k in ("argv", "host", "versions", "settings")}}
                for r in rows]

    # --- cells ------------------------------------------------------------------------------

    def upsert_cell(self, cell_hash: str, cell: dict[str, Any], label: str, eval_hash: str,
                    config: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO cells (hash, model, kind, method, scheme, tool, label, "
                "eval_hash, config, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (cell_hash, cell["model"], cell["kind"], cell["method"], cell["scheme"],
                 cell["tool"], label, eval_hash, _j(config), now()))

    def is_done(self, cell_hash: str) -> bool:
        return self.db.execute("SELECT 1 FROM results WHERE cell_hash=? LIMIT 1",
                               (cell_hash,)).fetchone() is not None

    # --- artifacts --------------------------------------------------------------------------

    def record_artifact(self, cell_hash: str, run_id: int, path: str, make_s: float | None,
                        info: dict[str, Any], layer_errors: list[dict[str, Any]]) -> int:
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO artifacts (cell_hash, run_id, path, make_s, info, created) "
                "VALUES (?,?,?,?,?,?)", (cell_hash, run_id, path, make_s, _j(info), now()))
            aid = int(cur.lastrowid or 0)
            db.executemany(
                "INSERT INTO layer_errors (artifact_id, layer, block, role, rel_error, numel) "
                "VALUES (?,?,?,?,?,?)",
                [(aid, e["layer"], e.get("block"), e.get("role"), float(e["rel_error"]),
                  e.get("numel")) for e in layer_errors])
        return aid

    def latest_artifact(self, cell_hash: str) -> dict[str, Any] | None:
        r = self.db.execute("SELECT * FROM artifacts WHERE cell_hash=? ORDER BY id DESC LIMIT 1",
                            (cell_hash,)).fetchone()
        return None if r is None else {**dict(r), "info": _uj(r["info"])}

    def layer_errors(self, artifact_id: int) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT layer, block, role, rel_error, numel FROM layer_errors "
                               "WHERE artifact_id=? ORDER BY rowid", (artifact_id,)).fetchall()
        return [dict(r) for r in rows]

    # --- results ----------------------------------------------------------------------------

    def record_result(self, cell_hash: str, run_id: int, artifact_id: int | None,
                      started: str, evaluation: dict[str, Any], metrics: dict[str, float | None],
                      timings: dict[str, float], generations: list[dict[str, Any]],
                      partial: Sequence[tuple[str, BaseException]] = ()) -> int:
        """Commit a finished cell: its result, metrics, timings and generations, together —
        and the errors of measurements that failed while the rest succeeded (``partial``:
        ``(step, exception)``; the cell is done, the report lists it as incomplete)."""
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO results (cell_hash, run_id, artifact_id, started, finished, eval) "
                "VALUES (?,?,?,?,?,?)",
                (cell_hash, run_id, artifact_id, started, now(), _j(evaluation)))
            rid = int(cur.lastrowid or 0)
            db.executemany("INSERT INTO metrics (result_id, name, value) VALUES (?,?,?)",
                           [(rid, k, None if v is None else float(v))
                            for k, v in metrics.items()])
            db.executemany("INSERT INTO timings (result_id, step, seconds) VALUES (?,?,?)",
                           [(rid, k, float(v)) for k, v in timings.items()])
            db.executemany("INSERT INTO generations (result_id, idx, prompt, output) "
                           "VALUES (?,?,?,?)",
                           [(rid, i, g.get("prompt"), g.get("output"))
                            for i, g in enumerate(generations)])
            for step, exc in partial:
                self._insert_error(db, cell_hash, run_id, step, exc)
        return rid

    def record_error(self, cell_hash: str, run_id: int, step: str, exc: BaseException) -> None:
        with self.transaction() as db:
            self._insert_error(db, cell_hash, run_id, step, exc)

    @staticmethod
    def _insert_error(db: sqlite3.Connection, cell_hash: str, run_id: int, step: str,
                      exc: BaseException) -> None:
        text = "".join(_tb.format_exception(type(exc), exc, exc.__traceback__))
        db.execute("INSERT INTO errors (cell_hash, run_id, step, type, message, traceback, at) "
                   "VALUES (?,?,?,?,?,?,?)",
                   (cell_hash, run_id, step, type(exc).__name__, str(exc) or repr(exc), text,
                    now()))

    # --- reading ----------------------------------------------------------------------------

    def results(self, eval_hash: str | None = None) -> list[ResultRow]:
        """The latest result of every finished cell (of one evaluation setting, if given),
        with all its metrics."""
        sql = ("SELECT r.id, r.cell_hash, r.run_id, r.finished, c.model, c.kind, c.method, "
               "c.scheme, c.tool, c.label, c.eval_hash, c.config, a.path AS artifact "
               "FROM results r JOIN cells c ON c.hash = r.cell_hash "
               "LEFT JOIN artifacts a ON a.id = r.artifact_id "
               "WHERE r.id = (SELECT MAX(id) FROM results WHERE cell_hash = r.cell_hash)")
        args: tuple[Any, ...] = ()
        if eval_hash is not None:
            sql += " AND c.eval_hash = ?"
            args = (eval_hash,)
        out = []
        for r in self.db.execute(sql + " ORDER BY r.id", args).fetchall():
            metrics = {m["name"]: m["value"] for m in self.db.execute(
                "SELECT name, value FROM metrics WHERE result_id=?", (r["id"],))}
            out.append(ResultRow(r["id"], r["cell_hash"], r["run_id"], r["model"], r["kind"],
                                 r["method"], r["scheme"], r["tool"], r["label"],
                                 r["eval_hash"], _uj(r["config"]), r["finished"], r["artifact"],
                                 metrics))
        return out

    def metric(self, result_id: int, name: str) -> float | None:
        r = self.db.execute("SELECT value FROM metrics WHERE result_id=? AND name=?",
                            (result_id, name)).fetchone()
        if r is None:
            raise KeyError(f"no metric {name!r} for result {result_id}")
        return r[0]  # type: ignore[no-any-return]

    def generations(self, result_id: int) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.execute(
            "SELECT idx, prompt, output FROM generations WHERE result_id=? ORDER BY idx",
            (result_id,))]

    def timings(self, result_id: int) -> dict[str, float]:
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT step, seconds FROM timings WHERE result_id=?", (result_id,))}

    def result_layer_errors(self, result_id: int) -> list[dict[str, Any]]:
        r = self.db.execute("SELECT artifact_id FROM results WHERE id=?", (result_id,)).fetchone()
        return [] if r is None or r[0] is None else self.layer_errors(int(r[0]))

    def open_errors(self, eval_hash: str | None = None) -> list[ErrorRow]:
        """The latest error of every cell that has no result (failed and not fixed since)."""
        sql = ("SELECT e.*, c.model, c.label, c.tool FROM errors e JOIN cells c "
               "ON c.hash = e.cell_hash WHERE e.id = (SELECT MAX(id) FROM errors "
               "WHERE cell_hash = e.cell_hash) AND NOT EXISTS (SELECT 1 FROM results "
               "WHERE cell_hash = e.cell_hash)")
        return self._error_rows(sql, eval_hash)

    def incomplete(self, eval_hash: str | None = None) -> list[ErrorRow]:
        """Errors committed with a cell's latest result: measurements that failed in a cell
        that is otherwise done (e.g. ``evaluate:speed``)."""
        sql = ("SELECT e.*, c.model, c.label, c.tool FROM errors e JOIN cells c "
               "ON c.hash = e.cell_hash JOIN results r ON r.id = (SELECT MAX(id) FROM results "
               "WHERE cell_hash = e.cell_hash) WHERE e.run_id = r.run_id "
               "AND e.step LIKE 'evaluate:%'")
        return self._error_rows(sql, eval_hash)

    def _error_rows(self, sql: str, eval_hash: str | None) -> list[ErrorRow]:
        """Run an ``errors e JOIN cells c`` query, optionally for one evaluation hash."""
        args: tuple[Any, ...] = ()
        if eval_hash is not None:
            sql += " AND c.eval_hash = ?"
            args = (eval_hash,)
        return [ErrorRow(r["cell_hash"], r["run_id"], r["model"], r["label"], r["tool"],
                         r["step"], r["type"], r["message"], r["traceback"], r["at"])
                for r in self.db.execute(sql + " ORDER BY e.id", args).fetchall()]

    def count(self, table: str) -> int:
        if table not in ("runs", "cells", "artifacts", "layer_errors", "results", "metrics",
                         "timings", "generations", "errors"):
            raise ValueError(table)
        return int(self.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


def _j(v: Any) -> str | None:
    return None if v is None else json.dumps(v, default=str, sort_keys=True)


def _uj(v: str | None) -> Any:
    return None if v is None else json.loads(v)
