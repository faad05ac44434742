"""What the server serves: models named at start, each opened into an engine once.

A request names a model by id; ids map to :class:`ServedModel`s fixed when the server
starts, so nothing in a request ever becomes a file path. A model's card (``/v1/models``)
carries its backend, size and bits per weight, and — when a ``compare`` results database is
given — the PPL and KLD that ``compare`` measured for the same artifact, so a user choosing
between two quantizations in the chat page sees what each one cost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.base import Engine
from ..errors import EdgequantError, ModelLoadError

META_KEYS = ("backend", "n_ctx", "size_bytes", "bits_per_weight", "kld", "ppl", "method",
             "scheme", "source")


@dataclass
class ServedModel:
    """One model the server answers for.

    Args:
        id: the name requests use (``"model"`` field).
        engine: the opened engine; None until :attr:`loader` has run.
        loader: opens the engine (run once, in the background, while ``/health`` says 503).
        meta: the model card's details (see :data:`META_KEYS`; missing ones are None).
    """

    id: str
    engine: Engine | None = None
    loader: Callable[[], Engine] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    error: str | None = None

    def load(self) -> Engine:
        if self.engine is None:
            if self.loader is None:
                raise ModelLoadError(f"model {self.id!r} has neither an engine nor a loader")
            self.engine = self.loader()
        if self.meta.get("backend") is None:   # what the caller did not say, the engine does
            self.meta.update({k: v for k, v in describe(self.engine).items()
                              if self.meta.get(k) is None})
        return self.engine

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created,
                "owned_by": "edgequant", "meta": {k: self.meta.get(k) for k in META_KEYS}}


def parse_spec(spec: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or ``SOURCE`` → ``(id, source)``; the id defaults to the file or
    folder name (a zoo name is its own id)."""
    name, sep, source = spec.partition("=")
    if sep and name and source and "/" not in name and os.sep not in name:
        return name, source
    source = spec
    return Path(source.rstrip("/\\")).name or source, source


def open_model(source: str, ctx: int, parallel: int, threads: int | None = None,
               kernels: str | None = None, dtype: str = "auto") -> Engine:
    """The engine of ``source`` as a server runs it.

    A ``.gguf`` file runs in llama.cpp with one context of ``ctx × parallel`` cells and
    ``parallel`` sequences (llama-server's ``-c``/``-np``). Anything else (a native
    artifact, a zoo name, an HF folder) runs in torch in ``dtype`` — ``auto``: bfloat16
    where the CPU multiplies it natively, so 4-bit layers run on the fused int4 kernel
    instead of dequantizing every weight per token — with ``kernels`` (default ``auto``)."""
    from ..backends.base import engine_of, open_runnable

    if str(source).lower().endswith(".gguf"):
        if not Path(source).is_file():
            raise ModelLoadError(f"{source} does not exist")
        runnable = open_runnable(source, threads=threads, n_ctx=ctx * parallel,
                                 parallel=parallel)
    else:
        opts: dict[str, Any] = {"threads": threads, "dtype": dtype}
        if kernels is not None:
            opts["kernels"] = kernels
        runnable = open_runnable(source, backend="torch", **opts)
    return engine_of(runnable)


def describe(engine: Engine) -> dict[str, Any]:
    """The card's details an engine knows about itself (size, bits per weight, backend)."""
    out: dict[str, Any] = {"backend": engine.backend}
    size_info = getattr(engine, "size_info", None)
    if callable(size_info):
        try:
            s = size_info()
            out.update(size_bytes=s.get("size_bytes"), bits_per_weight=s.get("bits_per_weight"))
        except (EdgequantError, OSError):
            pass
    recipe = getattr(getattr(engine, "model", None), "recipe", None)
    if recipe is not None:
        out.update(method=getattr(recipe, "name", None), scheme=getattr(recipe, "scheme", None))
    file_type = getattr(engine, "metadata", {}).get("general.file_type")
    if file_type is not None and out.get("scheme") is None:
        from ..gguf.mixtures import FILE_TYPES

        names = {v: k for k, v in FILE_TYPES.items()}
        out.update(method="gguf", scheme=names.get(int(file_type), f"file type {file_type}"))
    return out


def results_for(db: str | Path, sources: Sequence[str]) -> dict[str, dict[str, Any]]:
    """PPL, KLD and the method of each source that a ``compare`` results database measured
    (matched by the artifact's resolved path; a zoo name or HF folder matches the run's
    baseline cell). Sources it did not measure are absent."""
    from ..comparison.store import DB_NAME, Store

    path = Path(db)
    if path.is_dir():
        path = path / DB_NAME
    if not path.is_file():
        raise ModelLoadError(f"no compare results database at {path}")
    out: dict[str, dict[str, Any]] = {}
    with Store(path, create=False) as store:
        rows = store.results()
    by_path = {str(Path(r.artifact).resolve()): r for r in rows if r.artifact}
    for src in sources:
        row = by_path.get(str(Path(src).resolve()))
        if row is None:
            row = next((r for r in reversed(rows) if r.kind == "baseline" and
                        r.model == Path(src.rstrip("/")).name), None)
        if row is not None:
            out[src] = {"kld": row.m("kld_mean"), "ppl": row.m("ppl"), "method": row.method,
                        "scheme": row.scheme}
    return out
