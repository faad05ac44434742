"""Memory: the peak RSS of a fresh process that loads the model and runs the speed test.

The parent writes a request (the model's source, backend, prompt ids, threads) to a file and
starts ``python -c <bootstrap> REQUEST``. The child records its RSS before loading, opens the
model with :func:`~edgequant.backends.base.open_runnable`, runs
:func:`~edgequant.eval.speed.measure_speed` on its engine, and prints one JSON line: the speed
figures, ``peak_rss_mb`` (its own high-water mark ``VmHWM``: every byte it ever held resident,
interpreter and libraries included, nothing inherited from the parent — see
:func:`_peak_rss_mb` for why not ``ru_maxrss``), ``rss_before_load_mb``
(the interpreter and libraries alone), ``load_s``, and ``peak_cuda_mb`` on a GPU. Where
Linux lets a process reset its high-water mark (``/proc/self/clear_refs``), the peak is also
split: ``peak_rss_load_mb`` (up to the end of loading: converting a checkpoint's dtype holds
the file's pages and the converted copy at once) and ``peak_rss_run_mb`` (the speed test
alone: what running the model needs).

For a GGUF file the child imports the ``edgequant`` package without running its
``__init__`` (which imports torch), so its peak is llama.cpp + numpy + Python — what an
edge deployment of that file would hold — not torch's hundreds of MB (``edgequant.engine``,
its llama.cpp engine and sampling import no torch either).

Run by hand: ``python -m edgequant.eval.memory REQUEST.json``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import EvaluationError

MARKER = "EDGEQUANT_MEMORY_RESULT "
_BOOTSTRAP = """\
import importlib.util, sys, types
if sys.argv[2] == "llama.cpp":
    spec = importlib.util.find_spec("edgequant")
    pkg = types.ModuleType("edgequant")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    sys.modules["edgequant"] = pkg
from edgequant.eval.memory import child_main
child_main(sys.argv[1])
"""


def measure_fresh(spec: str, backend: str, prompt_ids: Sequence[int], new_tokens: int,
                  runs: int = 3, warmup: int = 1, threads: int | None = None,
                  options: dict[str, Any] | None = None, timeout: float = 1800.0
                  ) -> dict[str, Any]:
    """Run the speed test on ``spec`` in a fresh process; its speed and memory figures.

    ``options`` go to :func:`open_runnable` in the child (``threads`` overrides theirs).

    Raises:
        EvaluationError: the child failed or timed out (its last error lines are quoted).
    """
    request = {"spec": spec, "backend": backend, "prompt": [int(t) for t in prompt_ids],
               "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
               "options": {**(options or {}), **({"threads": threads} if threads else {})}}
    with tempfile.TemporaryDirectory(prefix="edgequant-mem-") as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps(request))
        cmd = [sys.executable, "-c", _BOOTSTRAP, str(req), backend]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise EvaluationError(f"the speed/memory subprocess for {spec} ran over "
                                  f"{timeout:.0f} s") from None
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])  # type: ignore[no-any-return]
    tail = " | ".join((res.stderr or res.stdout).strip().splitlines()[-3:])
    raise EvaluationError(f"the speed/memory subprocess for {spec} failed (exit "
                          f"{res.returncode}): {tail or 'no output'}")


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak RSS since it was exec'd.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that counter across ``execve``
    and folds in the address space the child was forked (or vforked) from — the *parent's*
    peak — so a child of a process that once held a large model would report that model's
    memory. ``VmHWM`` belongs to the fresh address space only.
    """
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # pragma: no cover - not Linux
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_main(request_path: str) -> None:
    """The child's side: load, measure, print one ``MARKER`` JSON line."""
    from ..backends.base import engine_of, open_runnable
    from .speed import measure_speed

    req = json.loads(Path(request_path).read_text())
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    runnable = open_runnable(req["spec"], backend=req["backend"], **req["options"])
    load_s = time.perf_counter() - t0
    load_peak = _peak_rss_mb()
    split = _reset_peak_rss()
    try:
        runtime = getattr(runnable, "runtime", None)
        speed = measure_speed(engine_of(runnable), req["prompt"], req["new_tokens"], req["runs"],
                              req["warmup"])
    finally:
        runnable.close()
    run_peak = _peak_rss_mb()
    out = {**speed.to_dict(), "peak_rss_mb": max(load_peak, run_peak),
           "peak_rss_load_mb": load_peak, "peak_rss_run_mb": run_peak if split else None,
           "rss_before_load_mb": before,
           "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "load_s": load_s, "peak_cuda_mb": None, "pid": os.getpid(),
           "runtime": runtime,
           "torch_imported": "torch" in sys.modules}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # pragma: no cover - GPU only
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(MARKER + json.dumps(out), flush=True)


if __name__ == "__main__":  # pragma: no cover
    child_main(sys.argv[1])
