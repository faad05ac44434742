"""The scheduler: one thread per served model that owns its engine and runs its slots.

A request becomes a :class:`Ticket` (its prompt ids, sampling parameters and an asyncio
queue of events for the HTTP handler). Tickets wait in a bounded FIFO; a full queue is
refused at once (the handler answers 503 with ``Retry-After``, as Ollama does) instead of
queueing without bound (llama-server). Each loop iteration the thread:

1. drops cancelled and timed-out tickets (a client that disconnected frees its slot at the
   next iteration — one decode step, far under a second for the models served here);
2. moves waiting tickets into free slots (each starts an engine :class:`Generation` on its
   own state, so tokens never cross between requests);
3. advances every active slot by one token with :meth:`Engine.step_batch` — the slots that
   decode share one batched forward pass (continuous batching: a new request joins at the
   next step instead of waiting for the others to finish) — and sends each ticket its text
   delta.

The engine is only ever touched from this thread, except under :attr:`Scheduler.lock`
(tokenizing a prompt in a handler), because an engine is used from one thread at a time.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..engine.base import Engine, Generation, GenerationResult
from ..engine.sampling import SamplingParams

EventKind = Literal["delta", "done", "error"]


@dataclass
class Event:
    """What a ticket's handler receives: a text ``delta`` (with the tokens it came from),
    ``done`` with the finished result, or an ``error`` with an HTTP status."""

    kind: EventKind
    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    result: GenerationResult | None = None
    status: int = 500
    message: str = ""


class Ticket:
    """One request's place in a scheduler.

    Args:
        prompt_ids: the prompt's token ids (already checked against the context).
        params: its sampling and stopping.
        loop: the event loop of the HTTP handler that reads :attr:`events`.
        deadline: ``time.monotonic()`` after which the request is stopped (None: never).
        logprobs: the number of alternatives to report per token (None: no log-probs).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop, deadline: float | None = None,
                 logprobs: int | None = None) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.loop = loop
        self.deadline = deadline
        self.logprobs = logprobs
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False
        self.enqueued = time.monotonic()
        self.started: float | None = None
        self.first_token: float | None = None
        self.generation: Generation | None = None
        self.sent_logprobs = 0

    def cancel(self) -> None:
        """Stop this request (the client went away): its slot is freed at the next step."""
        self.cancelled = True

    def _send(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:   # the handler's loop has closed: nobody is listening
            self.cancelled = True


def _deliver(events: list[tuple[Ticket, Event]]) -> None:
    """Hand a step's events to their handlers with one wake-up per event loop (a wake-up
    per slot per token costs the engine's threads CPU time on a small machine)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Event]]] = {}
    for t, ev in events:
        by_loop.setdefault(t.loop, []).append((t, ev))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:   # the loop has closed: nobody is listening
            for t, _ in items:
                t.cancelled = True


def _put_all(items: list[tuple[Ticket, Event]]) -> None:
    for t, ev in items:
        t.events.put_nowait(ev)


class QueueFull(Exception):
    """The scheduler's waiting queue is at capacity."""


class Scheduler:
    """The slots and the queue of one model.

    Args:
        engine: the model (owned by this scheduler's thread from now on).
        parallel: slots: requests generated at once.
        max_queue: requests that may wait for a slot; one more is refused.
        on_step: called after every step with ``(tickets advanced, seconds)`` (metrics).
    """

    def __init__(self, engine: Engine, parallel: int = 4, max_queue: int = 64,
                 on_step: Callable[[int, float], None] | None = None) -> None:
        if parallel < 1 or max_queue < 0:
            raise ValueError(f"parallel must be ≥ 1 and max_queue ≥ 0, got {parallel}, "
                             f"{max_queue}")
        self.engine = engine
        self.parallel = parallel
        self.max_queue = max_queue
        self.lock = threading.RLock()        # held while the engine computes
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._active: list[Ticket] = []
        self._stop = False
        self._on_step = on_step
        self._thread = threading.Thread(target=self._run, name=f"edgequant-{engine.name}",
                                        daemon=True)
        self._thread.start()

    # --- what handlers call ---------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        """Queue ``ticket``; raises :class:`QueueFull` when ``max_queue`` are waiting."""
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) + len(self._active) >= self.parallel + self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting for "
                                f"{self.parallel} busy slots")
            self._waiting.append(ticket)
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return len(self._active)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; requests still queued or running get an error event."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    # --- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._active:
                    self._cond.wait(0.5)
                if self._stop:
                    break
            self._reap()
            self._admit()
            if self._active:
                self._step()
        for t in [*self._active, *self._waiting]:
            self._fail(t, 503, "the server is shutting down")
        self._active.clear()
        self._waiting.clear()

    def _reap(self) -> None:
        """Free the slots of cancelled and timed-out requests; drop such waiting ones."""
        now = time.monotonic()
        for t in list(self._active):
            if t.cancelled or (t.deadline is not None and now > t.deadline):
                self._active.remove(t)
                if t.generation is not None:
                    with self.lock:
                        t.generation.close()
                if not t.cancelled:
                    self._fail(t, 504, "the request took longer than the server's "
                                       "--timeout and was stopped")
        with self._cond:
            keep = collections.deque(t for t in self._waiting if not t.cancelled and
                                     (t.deadline is None or now <= t.deadline))
            for t in self._waiting:
                if not t.cancelled and t not in keep:
                    self._fail(t, 504, "the request waited longer than the server's "
                                       "--timeout for a slot")
            self._waiting = keep

    def _admit(self) -> None:
        while len(self._active) < self.parallel:
            with self._cond:   # one move, so submit() never counts a ticket twice or not at all
                if not self._waiting:
                    return
                t = self._waiting.popleft()
                self._active.append(t)
            try:
                with self.lock:
                    t.generation = self.engine.start(t.prompt_ids, t.params,
                                                     logprobs=t.logprobs)
            except Exception as e:   # noqa: BLE001 - a bad request must not stop the thread
                self._active.remove(t)
                self._fail(t, 400, str(e))
                continue
            t.started = time.monotonic()

    def _step(self) -> None:
        tickets = list(self._active)
        gens = [t.generation for t in tickets]
        t0 = time.perf_counter()
        try:
            with self.lock:
                deltas = self.engine.step_batch(gens)  # type: ignore[arg-type]
        except Exception as e:   # noqa: BLE001 - fail these requests, keep serving
            for t in tickets:
                self._active.remove(t)
                if t.generation is not None:
                    t.generation.close()
                self._fail(t, 500, f"generation failed: {type(e).__name__}: {e}")
            return
        if self._on_step is not None:
            self._on_step(len(tickets), time.perf_counter() - t0)
        now = time.monotonic()
        out: list[tuple[Ticket, Event]] = []   # sent together: one wake-up of the event loop
        for t, delta in zip(tickets, deltas, strict=True):
            g = t.generation
            assert g is not None
            if g.error is not None:        # this one failed alone; the others went on
                self._active.remove(t)
                self._fail(t, 500, f"generation failed: {type(g.error).__name__}: "
                                   f"{g.error}")
                continue
            if t.first_token is None:
                t.first_token = now
            if delta or (t.logprobs is not None and g.token_logprobs):
                out.append((t, Event("delta", text=delta, tokens=self._new_logprobs(t))))
            if g.finished:
                self._active.remove(t)
                out.append((t, Event("done", result=g.result(), tokens=self._new_logprobs(t))))
        _deliver(out)

    @staticmethod
    def _new_logprobs(t: Ticket) -> list[dict[str, Any]]:
        """The log-probability records of the tokens sampled since the last event."""
        g = t.generation
        if t.logprobs is None or g is None:
            return []
        new = g.token_logprobs[t.sent_logprobs:]
        t.sent_logprobs = len(g.token_logprobs)
        return new

    def _fail(self, t: Ticket, status: int, message: str) -> None:
        t._send(Event("error", status=status, message=message))
