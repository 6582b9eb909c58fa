"""The HTTP API server: FastAPI routes over a `Backend`.

`POST /generate` takes the model's request as JSON and answers with its collected events,
or streams them as SSE (`stream: true`); `/health`, `/v1/models` and `/metrics` describe the
deployment. The runtime delivers events from its own thread: each request has an asyncio
queue fed through `call_soon_threadsafe`, and whatever may block (the model's
`process_prompt`, a metrics scrape) runs in a worker thread, so the event loop never waits
on the runtime.

Response of a non-streamed `/generate` (200):
`{"id", "events": [every event as JSON, tagged by "event"], "finish_reason", "usage",
"text": [the concatenated text of each completion index]}` (`text` only when the model
produced text). Bytes fields (audio samples, images, tensors) are base64, as msgspec
writes them. Streamed: one SSE frame per event, `event: <tag>` and `data: <event JSON>`,
then `data: [DONE]` after `finished`; an `error` event is the last frame instead. The
response status is decided by the first event, so a request that fails at once (rejected,
bad input found by a worker) gets its HTTP status even when streamed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mstar import events
from mstar.api_server.backend import Backend
from mstar.api_server.metrics import Metrics, RequestMetrics, status_of
from mstar.api_server.openai_protocol import InvalidRequest
from mstar.api_server.schemas import (
    check_body,
    mstar_version,
    native_request_model,
    openapi_document,
    request_body,
)
from mstar.config.settings import ServerSettings
from mstar.engine.work import RequestError

log = logging.getLogger("mstar.api_server")

#: Seconds a client should wait before retrying a 429 or a 503 (starting; or stopping
#: after a part of the deployment died, for a supervisor to start it again).
RETRY_AFTER_S = 1
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks its client
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
_RETRY = {"Retry-After": str(RETRY_AFTER_S)}
#: How deeply a JSON body may nest objects and arrays: deeper is a 400 found by a scan of
#: the raw bytes, before any parser or validator recurses into it.
MAX_JSON_DEPTH = 64
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')
_OPENERS, _CLOSERS = frozenset(b"[{"), frozenset(b"]}")


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, *, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}` (`code`: a
    short name such as "model_not_found", else the status)."""
    return {"error": {"message": message, "type": error_type(status), "param": param,
                      "code": code if code is not None else status}}


def error_response(status: int, message: str, *, param: str | None = None,
                   headers: Mapping[str, str] | None = None,
                   code: str | int | None = None) -> JSONResponse:
    """An error answer in OpenAI's shape (see `error_body`)."""
    body = error_body(status, message, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


class ApiError(Exception):
    """An HTTP error a route raises; answered by `error_response`."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: Mapping[str, str] | None = None, code: str | int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client closed its connection while its request ran."""


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


class RequestIdMiddleware:
    """Gives every HTTP request an id (the client's `x-request-id` when sane, else a new
    one) that the runtime and every log line use, puts it on the response, logs one line per
    request (uvicorn's access log is off), and answers an unhandled exception with a 500
    carrying the id, never a trace. A request whose route took a metrics recorder
    (`Runner.recorder`) is counted here, just before its last byte leaves, under the status
    the client gets."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        rid = given if given is not None and _SANE_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        started, status = time.perf_counter(), 0

        def count(http_status: int) -> None:
            recorder = scope["state"].get("recorder")
            if recorder is not None:
                recorder.count(http_status)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = rid
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                count(status)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("%s %s %s: unhandled error", rid, scope["method"], scope["path"])
            if status == 0:  # nothing sent yet: the client still gets a JSON answer
                await error_response(500, f"internal server error (request id {rid})")(
                    scope, receive, send_with_id)
            status = status or 500
        count(status or 499)  # a response cut short (the client left, an error mid-body)
        log.info("%s %s %s -> %d in %.3f s", rid, scope["method"], scope["path"], status,
                 time.perf_counter() - started)


def _require_key(api_key: str) -> Callable[[Request], Awaitable[None]]:
    expected = api_key.encode()

    async def require_key(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 expected):
            raise ApiError(401, "invalid or missing API key: send `Authorization: Bearer "
                                "<key>`", headers={"WWW-Authenticate": "Bearer"})

    return require_key


def decode_json(raw: bytes | str, *, what: str = "the body",
                param: str | None = None) -> dict[str, Any]:
    """`raw` as a JSON object; a 400 naming `param` when it is not JSON, not an object, or
    nests deeper than `MAX_JSON_DEPTH`."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    depth = 0
    for token in _JSON_TOKEN.finditer(data):
        char = data[token.start()]
        if char in _OPENERS:
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels",
                               param=param, code="json_too_deep")
        elif char in _CLOSERS:
            depth -= 1
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"{what} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{what} must be a JSON object", param=param)
    return value


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object (`decode_json`), refused past `limit` bytes (declared or
    streamed)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {int(length)} bytes is over the limit of "
                            f"{limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    return decode_json(body)


def terminal(event: events.Event) -> bool:
    return isinstance(event, events.Finished | events.Error)


def event_status(event: events.Error) -> int:
    return event.code if 400 <= event.code < 600 else 500


def error_event_error(event: events.Error) -> ApiError:
    """The `ApiError` a route raises for a request that failed with `event` (429 and 503
    say when to retry)."""
    status = event_status(event)
    return ApiError(status, event.message, param=event.param,
                    headers=_RETRY if status in (429, 503) else None)


def _sse_frame(event: events.Event) -> bytes:
    tag = type(event).__struct_config__.tag
    return b"event: " + str(tag).encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


def _result(request_id: str, collected: list[events.Event]) -> dict[str, Any]:
    """The JSON of a finished non-streamed request (see the module docstring)."""
    last = collected[-1]
    assert isinstance(last, events.Finished)
    out: dict[str, Any] = {"id": request_id, "events": collected,
                           "finish_reason": last.reason, "usage": last.usage}
    texts: dict[int, list[str]] = {}
    for event in collected:
        if isinstance(event, events.TextDelta):
            texts.setdefault(event.index, []).append(event.text)
    if texts:
        out["text"] = ["".join(texts.get(i, ())) for i in range(max(texts) + 1)]
    return out


class Run:
    """One submitted request as the app sees it: the queue its events arrive in, its
    metrics, and its end (finished, or cancelled when the client leaves or it falls
    silent for `timeout` seconds)."""

    def __init__(self, backend: Backend, request_id: str, timeout: float,
                 metrics: RequestMetrics):
        self.backend, self.request_id, self.timeout = backend, request_id, timeout
        self.metrics = metrics
        self.queue: asyncio.Queue[events.Event] = asyncio.Queue()
        self.done = False
        self._loop = asyncio.get_running_loop()
        self._check_client_at = 0.0

    def sink(self, event: events.Event) -> None:
        """Called from the runtime's thread."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed (server stopped): nobody is listening
            pass

    async def next(self, request: Request | None = None) -> events.Event:
        """The next event. After `timeout` s without one the request is cancelled and a
        504 `Error` stands in; with `request`, a client that left (checked every
        `_DISCONNECT_POLL_S` s, events or not) raises `ClientGone`."""
        deadline = self._loop.time() + self.timeout
        while True:
            now = self._loop.time()
            if request is not None and now >= self._check_client_at:
                self._check_client_at = now + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise ClientGone
            if now >= deadline:
                self.close("timeout")
                return events.Error(f"no output for {self.timeout:g} s: request "
                                    f"{self.request_id} cancelled", 504, "timeout")
            wait = deadline - now
            if request is not None:
                wait = min(wait, self._check_client_at - now)
            try:
                event = await asyncio.wait_for(self.queue.get(), wait)
            except TimeoutError:
                continue
            self.metrics.event(event)
            if terminal(event) and not self.done:
                self.done = True
                self.metrics.finish(status_of(event))
                log.info("%s ended: %s", self.request_id, event.reason
                         if isinstance(event, events.Finished) else f"error {event.code}")
            return event

    def close(self, status: str = "abort") -> None:
        """Cancel the request unless it has ended; safe to call more than once."""
        if not self.done:
            self.done = True
            self.backend.cancel(self.request_id)
            self.metrics.finish(status)
            log.info("%s cancelled (%s)", self.request_id, status)


class EventStream(StreamingResponse):
    """A streamed answer (SSE by default) whose `on_close` runs however the response ends
    (finished, the client gone, the server stopping), so a request still running is
    cancelled."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], *,
                 media_type: str = "text/event-stream"):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _sse(run: Run, first: events.Event) -> AsyncIterator[bytes]:
    event = first
    while True:
        yield _sse_frame(event)
        if terminal(event):
            break
        event = await run.next()
    if isinstance(event, events.Finished):
        yield b"data: [DONE]\n\n"


class Runner:
    """Admission and the start of a request, shared by every route that runs one: refuse
    early, never queue (a deployment that cannot serve; one at its limit, counting the
    requests still being submitted so a flood never piles up there), then submit and wait
    for the first event, which decides the HTTP status."""

    def __init__(self, backend: Backend, settings: ServerSettings, metrics: Metrics):
        self.backend, self.settings, self.metrics = backend, settings, metrics
        self.limit = backend.model_info()["max_concurrent_requests"]
        self._admitting: set[str] = set()  # request ids being submitted

    def recorder(self, request: Request) -> RequestMetrics:
        """The request's metrics recorder, made on first use; the middleware counts it
        when the response ends (routes take it first, so refusals count too)."""
        recorder = getattr(request.state, "recorder", None)
        if recorder is None:
            recorder = request.state.recorder = self.metrics.request()
        return recorder

    def admit(self) -> None:
        problem = self.backend.failed()
        if problem is not None:
            raise ApiError(503, f"the deployment cannot serve: {problem}", headers=_RETRY)
        if not self.backend.ready():
            raise ApiError(503, "the deployment is starting; retry shortly", headers=_RETRY)
        # a request being submitted counts once: the backend may have it already
        live = self.backend.live_requests()
        live += sum(not self.backend.is_live(rid) for rid in self._admitting)
        if live >= self.limit:
            raise ApiError(429, f"server busy: {self.limit} requests are running; retry "
                                "shortly", headers=_RETRY)

    async def start(self, request: Request, body: Mapping[str, Any], *,
                    kind: str = "generate", blobs: list[bytes] | None = None,
                    ) -> tuple[Run, events.Event]:
        """Submit and await the first event. An `Error` first event raises `ApiError`
        (the request has ended); the caller owns the `Run` and must `close` it."""
        rid = request.state.request_id
        recorder = self.recorder(request)
        try:
            self.admit()
            run = Run(self.backend, rid, self.settings.timeout, recorder)
            self._admitting.add(rid)
            try:
                await anyio.to_thread.run_sync(
                    lambda: self.backend.submit(body, run.sink, rid, kind=kind,
                                                blobs=blobs or ()))
            except RequestError as exc:
                raise ApiError(exc.code, str(exc), param=exc.param,
                               headers=_RETRY if exc.code == 429 else None) from None
            finally:
                self._admitting.discard(rid)
        except ApiError as exc:  # counted by its HTTP status (RequestMetrics.count)
            log.info("%s refused (%d): %s", rid, exc.status, exc.message)
            raise
        log.info("%s submitted (%s)", rid, kind)
        try:
            first = await run.next(request)
        except ClientGone:
            run.close()
            raise ApiError(499, "the client closed the request") from None
        except BaseException:
            run.close()
            raise
        if isinstance(first, events.Error):
            run.close()
            raise error_event_error(first)
        return run, first


async def collect(run: Run, first: events.Event, request: Request) -> list[events.Event]:
    """Every event of a non-streamed request, the last one `Finished` (an `Error` raises
    `ApiError`)."""
    collected = [first]
    while not terminal(collected[-1]):
        collected.append(await run.next(request))
    last = collected[-1]
    if isinstance(last, events.Error):
        raise error_event_error(last)
    return collected


def create_app(backend: Backend, settings: ServerSettings) -> FastAPI:
    """The HTTP app over `backend`; `settings` gives the API key, the request timeout
    (seconds without an event before a request is cancelled with 504), the body limit and
    the media limits. Routes beyond `/generate` come from the model's capabilities (the
    OpenAI-compatible ones: `mstar.api_server.openai_routes`)."""
    from mstar.api_server.openai_routes import add_openai_routes
    from mstar.api_server.speech_route import add_speech_route

    info = backend.model_info()
    created = int(time.time())
    metrics = Metrics(backend.stats)
    runner = Runner(backend, settings, metrics)
    backend.use_media_limits(settings.media_limits())
    native = native_request_model(info)
    app = FastAPI(title="mstar", version=mstar_version(), openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.metrics = metrics  # routes added to the app count their requests with it
    app.add_middleware(RequestIdMiddleware)
    guarded = APIRouter(dependencies=[Depends(_require_key(settings.api_key))]
                        if settings.api_key else [])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.message, param=exc.param, headers=exc.headers,
                              code=exc.code)

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, exc: InvalidRequest) -> Response:
        return error_response(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        message = {404: f"no route for {where}", 405: f"method not allowed: {where}"}.get(
            exc.status_code, str(exc.detail))
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        fields = [".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
                  for e in errors]
        message = "; ".join(f"{f or 'request'}: {e.get('msg', 'invalid')}"
                            for f, e in zip(fields, errors)) or "invalid request"
        return error_response(400, message, param=(fields[0] or None) if fields else None)

    @app.get("/health")
    async def health() -> Response:
        problem = backend.failed()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "detail": problem}, status_code=503,
                                headers=_RETRY)
        if not backend.ready():
            return JSONResponse({"status": "starting"}, status_code=503, headers=_RETRY)
        return JSONResponse({"status": "ok"})

    @guarded.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": info["name"], "object": "model", "created": created, "owned_by": "mstar",
            "capabilities": list(info["capabilities"]), "max_model_len": info["max_model_len"],
        }]}

    @guarded.get("/metrics")
    async def metrics_text() -> Response:
        return Response(await anyio.to_thread.run_sync(metrics.render),
                        media_type=CONTENT_TYPE_LATEST)

    @guarded.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return openapi_document(app)

    @guarded.post("/generate", openapi_extra=request_body(native, "The model's own request "
                  "(its `request_schema`), plus `stream` (SSE when true)."))
    async def generate(request: Request) -> Response:
        rid = request.state.request_id
        runner.recorder(request)
        body = await read_json(request, settings.max_body_bytes)
        stream = body.pop("stream", False)  # the transport's option, not the model's
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream",
                           code="invalid_type")
        if native is not None:
            check_body(native, body)
        run, first = await runner.start(request, body)
        if stream:
            return EventStream(_sse(run, first), on_close=run.close)
        try:
            return Response(msgspec.json.encode(_result(rid, await collect(run, first,
                                                                             request))),
                            media_type="application/json")
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request is cancelled
        finally:
            run.close()

    add_openai_routes(guarded, runner, info, settings)
    add_speech_route(guarded, runner, info, settings)
    app.include_router(guarded)
    return app


__all__ = ["RETRY_AFTER_S", "ApiError", "ClientGone", "EventStream", "RequestIdMiddleware",
           "Run", "Runner", "collect", "create_app", "error_body", "error_event_error",
           "error_response",
           "error_type", "new_request_id", "read_json"]
