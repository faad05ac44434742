"""The HTTP server: OpenAI's chat and completion endpoints over edgequant engines, a
Prometheus ``/metrics``, and the browser chat page at ``/``.

Every route is a thin layer over a :class:`~.scheduler.Scheduler` (one per model): parse and
check the request (strict types, the context's limit), render the chat template and
tokenize, queue a :class:`~.scheduler.Ticket`, then stream its events as Server-Sent Events
or gather them into one response. Security defaults are llama-server's with the holes
closed: loopback by default (the CLI), a Bearer key on every route but ``/health`` and the
static page, a body-size limit, CORS off unless an origin is named, and no request field
that becomes a path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..engine.base import Engine, GenerationResult
from ..engine.sampling import EngineError
from .metrics import CONTENT_TYPE, Metrics
from .models import ServedModel
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse,
)
from .scheduler import Event, QueueFull, Scheduler, Ticket

log = logging.getLogger("edgequant.serve")
PUBLIC = ("/health", "/static/", "/favicon.ico")
MAX_BODY = 4 << 20
RETRY_AFTER_S = 1


class Server:
    """What the routes share: the models, their schedulers and the metrics."""

    def __init__(self, models: Sequence[ServedModel], parallel: int, max_queue: int, ctx: int,
                 request_timeout: float | None, max_body: int) -> None:
        ids = [m.id for m in models]
        if not models:
            raise ValueError("serve at least one model")
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be distinct, got {ids}; name them NAME=SOURCE")
        self.models = {m.id: m for m in models}
        self.parallel, self.max_queue, self.ctx = parallel, max_queue, ctx
        self.request_timeout, self.max_body = request_timeout, max_body
        self.schedulers: dict[str, Scheduler] = {}
        self.metrics = Metrics()
        self.loaded = threading.Event()

    # --- loading --------------------------------------------------------------------------

    def load_all(self) -> None:
        """Open every model in order (a model that fails keeps its error; /health says so)."""
        for m in self.models.values():
            try:
                engine = m.load()
            except Exception as e:  # noqa: BLE001 - reported by /health and the CLI
                m.error = f"{type(e).__name__}: {e}"
                continue
            m.meta["n_ctx"] = self.context_of(engine)
            batch = self.metrics.batch.labels(m.id)

            def observe(n: int, _seconds: float, batch: Any = batch) -> None:
                batch.observe(n)
            self.schedulers[m.id] = Scheduler(engine, self.parallel, self.max_queue,
                                              on_step=observe)
            self.metrics.slots.labels(m.id).set(self.parallel)
        self.loaded.set()

    def close(self) -> None:
        for s in self.schedulers.values():
            s.close()
        for m in self.models.values():
            if m.engine is not None:
                m.engine.close()

    def context_of(self, engine: Engine) -> int:
        return min(self.ctx, engine.max_context)

    @property
    def errors(self) -> dict[str, str]:
        return {m.id: m.error for m in self.models.values() if m.error}

    def scheduler(self, model_id: str) -> Scheduler:
        if model_id not in self.models:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                                f"{', '.join(self.models)}", param="model",
                           code="model_not_found")
        if not self.loaded.is_set() and model_id not in self.schedulers:
            raise APIError(503, f"the model {model_id!r} is still loading",
                           type="unavailable_error", headers={"Retry-After": "5"})
        if model_id not in self.schedulers:
            raise APIError(503, f"the model {model_id!r} failed to load: "
                                f"{self.models[model_id].error}", type="unavailable_error")
        return self.schedulers[model_id]


class Guard:
    """API key check (pure ASGI, so streaming and disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app, self.key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key is not None and scope["method"] != "OPTIONS":
            path: str = scope["path"]
            if path != "/" and not path.startswith(PUBLIC):
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not hmac.compare_digest(token.encode(), self.key.encode()):
                    err = APIError(401, "missing API key: send 'Authorization: Bearer KEY'"
                                   if not token else "incorrect API key provided",
                                   code="invalid_api_key")
                    await _error_response(err)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(models: Sequence[ServedModel] | Mapping[str, Engine], *,
               api_key: str | None = None, parallel: int = 4, max_queue: int = 64,
               ctx: int = 2048, cors: str | Sequence[str] | None = None,
               request_timeout: float | None = 600.0, max_body_bytes: int = MAX_BODY
               ) -> FastAPI:
    """The server's ASGI app (run it with uvicorn, or :func:`.testing.running_server`).

    Args:
        models: the models served, as :class:`ServedModel`s or ``{id: engine}``; engines not
            yet opened are opened in the background after start-up (``/health`` answers 503
            until they are).
        api_key: when set, every route but ``/health`` and the chat page's files needs
            ``Authorization: Bearer <api_key>``.
        parallel: slots per model: requests generated at once (batched where the engine
            can).
        max_queue: requests per model that may wait for a slot; beyond that, 503.
        ctx: tokens per request (prompt + completion), at most the model's own context.
        cors: origins allowed to call the API from a browser (None: same origin only).
        request_timeout: seconds a request may take, queueing included (None: no limit).
        max_body_bytes: the largest request body accepted (413 beyond).
    """
    served = [ServedModel(k, engine=v) for k, v in models.items()] \
        if isinstance(models, Mapping) else list(models)
    if parallel < 1 or max_queue < 0 or ctx < 1:
        raise ValueError(f"parallel and ctx must be ≥ 1 and max_queue ≥ 0, got {parallel}, "
                         f"{ctx}, {max_queue}")
    server = Server(served, parallel, max_queue, ctx, request_timeout, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=server.load_all, name="edgequant-load", daemon=True)
        loader.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loader.join)
            await asyncio.to_thread(server.close)

    app = FastAPI(title="edgequant", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    _routes(app, server)
    app.add_middleware(Guard, api_key=api_key)
    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[cors] if isinstance(cors, str)
                           else list(cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


# --- routes ----------------------------------------------------------------------------------

def _routes(app: FastAPI, server: Server) -> None:
    metrics = server.metrics
    static = resources.files("edgequant.serve") / "static"

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(e.status)).inc()
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(e.errors()[0].get("msg", e))))

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        metrics.requests.labels(request.url.path, "500").inc()
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                        type="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        page = static / "index.html"
        if not page.is_file():
            return PlainTextResponse("edgequant serve: the chat page is not installed; the "
                                     "API is at /v1", status_code=200)
        return FileResponse(str(page), headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        # one flat folder of files shipped in the package: a name is never a path
        if "/" in name or "\\" in name or name.startswith("."):
            raise APIError(404, "not found", type="not_found_error")
        f = static / name
        if not f.is_file():
            raise APIError(404, f"no static file {name!r}", type="not_found_error")
        return FileResponse(str(f), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if not server.loaded.is_set():
            return JSONResponse({"status": "loading"}, status_code=503,
                                headers={"Retry-After": "5"})
        if server.errors:
            return JSONResponse({"status": "error", "errors": server.errors}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list",
                             "data": [m.card() for m in server.models.values()]})

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> JSONResponse:
        if model_id not in server.models:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(server.models[model_id].card())

    @app.get("/metrics")
    async def prometheus() -> Response:
        for mid, s in server.schedulers.items():
            metrics.queue.labels(mid).set(s.queued)
            metrics.busy.labels(mid).set(s.busy)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req: TokenizeRequest = parse(TokenizeRequest, await _json(request, server.max_body))
        sched = server.scheduler(req.model or next(iter(server.models)))

        def run() -> list[int]:
            with sched.lock:
                e = sched.engine
                return e.encode_prompt(req.content) if req.add_special \
                    else e.tokenize(req.content, special=True)
        return JSONResponse({"tokens": await asyncio.to_thread(run)})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req: DetokenizeRequest = parse(DetokenizeRequest, await _json(request, server.max_body))
        sched = server.scheduler(req.model or next(iter(server.models)))
        bad = [t for t in req.tokens if not 0 <= t < sched.engine.vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary "
                                f"[0, {sched.engine.vocab_size})", param="tokens")

        def run() -> str:
            with sched.lock:
                return sched.engine.detokenize(req.tokens)
        return JSONResponse({"content": await asyncio.to_thread(run)})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        req: ChatRequest = parse(ChatRequest, await _json(request, server.max_body))
        return await _generate(request, server, req, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = parse(CompletionRequest, await _json(request, server.max_body))
        return await _generate(request, server, req, chat=False)


async def _json(request: Request, limit: int) -> Any:
    """The body as JSON, read up to ``limit`` bytes (413 beyond, before reading it all)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


# --- generation ------------------------------------------------------------------------------

async def _generate(request: Request, server: Server, req: ChatRequest | CompletionRequest,
                    chat: bool) -> Response:
    received = time.monotonic()
    req.check_supported()
    sched = server.scheduler(req.model)
    engine = sched.engine
    ctx = server.context_of(engine)

    def encode() -> list[int]:
        with sched.lock:
            if isinstance(req, ChatRequest):
                return engine.encode_prompt(engine.apply_chat_template(req.chat_messages()))
            prompt = req.one_prompt()
            if isinstance(prompt, list):
                bad = [t for t in prompt if not 0 <= t < engine.vocab_size]
                if bad:
                    raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary "
                                        f"[0, {engine.vocab_size})", param="prompt")
            elif not prompt:
                raise APIError(400, "prompt is empty", param="prompt")
            return engine.encode_prompt(prompt)
    try:
        ids = await asyncio.to_thread(encode)
    except EngineError as e:
        raise APIError(400, str(e), param="messages" if chat else "prompt") from None
    n = len(ids)
    if n >= ctx:
        raise APIError(400, f"the prompt is {n} tokens; this server's context is {ctx} "
                            "tokens per request (prompt + completion): shorten the prompt",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    asked = req.requested_max_tokens
    if asked is not None and n + asked > ctx:
        raise APIError(400, f"the prompt's {n} tokens plus max_tokens {asked} exceed the "
                            f"context of {ctx} tokens: lower max_tokens to at most "
                            f"{ctx - n}", param="max_tokens", code="context_length_exceeded")
    max_tokens = asked if asked is not None else (ctx - n if chat else min(16, ctx - n))
    try:
        params = req.sampling(max_tokens)
    except EngineError as e:
        raise APIError(400, str(e)) from None
    deadline = received + server.request_timeout if server.request_timeout else None
    ticket = Ticket(ids, params, asyncio.get_running_loop(), deadline, req.n_logprobs)
    try:
        sched.submit(ticket)
    except QueueFull as e:
        server.metrics.rejected.labels(req.model).inc()
        raise APIError(503, f"the server is busy ({e}); retry shortly",
                       type="unavailable_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    server.metrics.prompt_tokens.labels(req.model).inc(n)
    reply = _Reply(server, req, chat, ticket, received)
    if req.stream:
        server.metrics.requests.labels(request.url.path, "200").inc()
        return StreamingResponse(reply.stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    body = await reply.collect(request)
    server.metrics.requests.labels(request.url.path, "200").inc()
    return JSONResponse(body)


class _Reply:
    """One request's answer in OpenAI's shapes, built from its ticket's events."""

    def __init__(self, server: Server, req: ChatRequest | CompletionRequest, chat: bool,
                 ticket: Ticket, received: float) -> None:
        self.server, self.req, self.chat, self.ticket = server, req, chat, ticket
        self.received = received
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._chunk_object = "chat.completion.chunk" if chat else "text_completion"
        self._pending: list[dict[str, Any]] = []   # log-prob records not yet sent
        self._covered = 0                          # characters the sent records spell
        self._offset = 0                           # text_offset of the next record

    # --- pieces ---------------------------------------------------------------------------

    def _finish_reason(self, result: GenerationResult) -> str:
        return "length" if result.finish_reason == "length" else "stop"

    def _usage(self, result: GenerationResult) -> dict[str, int]:
        return {"prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens}

    def _timings(self, result: GenerationResult, done: float) -> dict[str, Any]:
        """llama-server's ``timings``, measured on the wall clock the client lives on: time
        to first token from the request's arrival (queueing included), decode rate from the
        first token to the last."""
        first = self.ticket.first_token or done
        decode_s = done - first
        n = result.completion_tokens
        return {"prompt_n": result.prompt_tokens, "prompt_ms": 1e3 * result.prefill_s,
                "predicted_n": n, "predicted_ms": 1e3 * decode_s,
                "predicted_per_second": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
                "ttft_ms": 1e3 * (first - self.received)}

    def _observe(self, result: GenerationResult, done: float) -> None:
        m, mid = self.server.metrics, self.req.model
        m.generation_tokens.labels(mid).inc(result.completion_tokens)
        m.finished.labels(mid, self._finish_reason(result)).inc()
        first = self.ticket.first_token or done
        m.ttft.labels(mid).observe(first - self.received)
        if result.completion_tokens > 1:
            m.tpot.labels(mid).observe((done - first) / (result.completion_tokens - 1))
        m.latency.labels(mid).observe(done - self.received)

    def _take(self, upto: int, final: bool) -> list[dict[str, Any]]:
        """The pending log-prob records whose text lies within the first ``upto`` characters
        of the answer; at the end (``final``) the one crossing a stop string's cut is
        clipped to it and those past the end are dropped, so the sent tokens spell the
        answer exactly."""
        out = []
        while self._pending:
            r = self._pending[0]
            end = self._covered + len(r["text"])
            if end > upto:
                if not final:
                    break
                keep = upto - self._covered
                if keep > 0:
                    out.append({**r, "text": r["text"][:keep]})
                    self._covered += keep
                self._pending.clear()
                break
            out.append(r)
            self._covered = end
            self._pending.pop(0)
        return out

    def _logprobs(self, records: list[dict[str, Any]]) -> dict[str, Any] | None:
        """``records`` in OpenAI's shape: chat's ``content`` list, or the completions API's
        parallel lists."""
        if self.ticket.logprobs is None:
            return None
        if self.chat:
            def entry(text: str, lp: float) -> dict[str, Any]:
                return {"token": text, "logprob": lp, "bytes": list(text.encode())}
            return {"content": [{**entry(r["text"], r["logprob"]),
                                 "top_logprobs": [entry(a["text"], a["logprob"])
                                                  for a in r["top"]]} for r in records]}
        offsets = []
        for r in records:
            offsets.append(self._offset)
            self._offset += len(r["text"])
        return {"tokens": [r["text"] for r in records],
                "token_logprobs": [r["logprob"] for r in records],
                "top_logprobs": [{a["text"]: a["logprob"] for a in r["top"]} for r in records],
                "text_offset": offsets}

    def _chunk(self, delta: dict[str, Any] | str, finish: str | None = None,
               logprobs: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        if self.chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
        out = {"id": self.id, "object": self._chunk_object,
               "created": self.created, "model": self.req.model, "choices": [choice], **extra}
        if self.req.include_usage:
            out.setdefault("usage", None)
        return out

    @staticmethod
    def _error_payload(ev: Event) -> APIError:
        kind = {400: "invalid_request_error", 503: "unavailable_error",
                504: "timeout_error"}.get(ev.status, "server_error")
        return APIError(ev.status, ev.message, type=kind)

    # --- streamed ---------------------------------------------------------------------------

    async def stream(self) -> AsyncIterator[str]:
        t = self.ticket
        ended = False      # the generation ended (done or error) rather than the client left
        streamed = 0       # characters of the answer sent
        try:
            yield _sse(self._chunk({"role": "assistant", "content": ""} if self.chat else ""))
            while not ended:
                ev = await t.events.get()
                self._pending += ev.tokens
                if ev.kind == "delta":
                    streamed += len(ev.text)
                    yield _sse(self._chunk({"content": ev.text} if self.chat else ev.text,
                                           logprobs=self._logprobs(self._take(streamed,
                                                                              False))))
                    continue
                ended = True
                if ev.kind == "error":
                    yield _sse(self._error_payload(ev).body())
                    continue
                assert ev.result is not None
                done = time.monotonic()
                self._observe(ev.result, done)
                rest = self._take(streamed, True)
                yield _sse(self._chunk({} if self.chat else "", self._finish_reason(ev.result),
                                       logprobs=self._logprobs(rest) if rest else None,
                                       timings=self._timings(ev.result, done)))
                if self.req.include_usage:
                    yield _sse({"id": self.id, "object": self._chunk_object, "created":
                                self.created, "model": self.req.model, "choices": [],
                                "usage": self._usage(ev.result)})
            yield "data: [DONE]\n\n"
        finally:
            if not ended:   # the client went away (the task was cancelled): free the slot
                self.server.metrics.cancelled.labels(self.req.model).inc()
                t.cancel()

    # --- whole ------------------------------------------------------------------------------

    async def collect(self, request: Request) -> dict[str, Any]:
        t = self.ticket
        text: list[str] = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(t.events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.server.metrics.cancelled.labels(self.req.model).inc()
                        t.cancel()
                        raise APIError(499, "the client closed the connection") from None
                    continue
                self._pending += ev.tokens
                if ev.kind == "delta":
                    text.append(ev.text)
                elif ev.kind == "error":
                    raise self._error_payload(ev)
                else:
                    break
        except asyncio.CancelledError:
            t.cancel()
            raise
        assert ev.result is not None
        done = time.monotonic()
        self._observe(ev.result, done)
        content = "".join(text)
        finish = self._finish_reason(ev.result)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish,
                                  "logprobs": self._logprobs(self._take(len(content), True))}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": content}
        else:
            choice["text"] = content
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.req.model, "choices": [choice],
                "usage": self._usage(ev.result), "timings": self._timings(ev.result, done)}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"
