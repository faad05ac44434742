"""Memory: the peak RSS of a fresh process that loads the model and runs the speed test.

The parent writes a request (the model's source, backend, prompt ids, threads) to a file and
starts ``python -c <bootstrap> REQUEST``. The child records its RSS before loading, opens the
model with :func:`~edgequant.backends.base.open_runnable`, runs
:func:`~edgequant.eval.speed.measure_speed`, and prints one JSON line: the speed figures,
``peak_rss_mb`` (its own ``getrusage(RUSAGE_SELF).ru_maxrss``: every byte it ever held,
interpreter and libraries included, nothing shared with other models), ``rss_before_load_mb``
(the interpreter and libraries alone), ``load_s``, and ``peak_cuda_mb`` on a GPU.

For a GGUF file the child imports the ``edgequant`` package without running its
``__init__`` (which imports torch), so its peak is llama.cpp + numpy + Python — what an
edge deployment of that file would hold — not torch's hundreds of MB.

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
                  timeout: float = 1800.0) -> dict[str, Any]:
    """Run the speed test on ``spec`` in a fresh process; its speed and memory figures.

    Raises:
        EvaluationError: the child failed or timed out (its last error lines are quoted).
    """
    request = {"spec": spec, "backend": backend, "prompt": [int(t) for t in prompt_ids],
               "new_tokens": new_tokens, "runs": runs, "warmup": warmup, "threads": threads}
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


def _rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def child_main(request_path: str) -> None:
    """The child's side: load, measure, print one ``MARKER`` JSON line."""
    from ..backends.base import open_runnable
    from .speed import measure_speed

    req = json.loads(Path(request_path).read_text())
    before = _rss_mb()
    t0 = time.perf_counter()
    opts: dict[str, Any] = {"threads": req["threads"]} if req["threads"] else {}
    runnable = open_runnable(req["spec"], backend=req["backend"], **opts)
    load_s = time.perf_counter() - t0
    try:
        speed = measure_speed(runnable, req["prompt"], req["new_tokens"], req["runs"],
                              req["warmup"])
    finally:
        runnable.close()
    out = {**speed.to_dict(), "peak_rss_mb": _peak_rss_mb(), "rss_before_load_mb": before,
           "load_s": load_s, "peak_cuda_mb": None, "pid": os.getpid(),
           "torch_imported": "torch" in sys.modules}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():  # pragma: no cover - GPU only
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(MARKER + json.dumps(out), flush=True)


if __name__ == "__main__":  # pragma: no cover
    child_main(sys.argv[1])
