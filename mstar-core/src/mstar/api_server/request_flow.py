"""How one request flows between a route and the `Backend`, shared by every route.

Admission (`Runner`: refuse early with 429/503, never queue), submission and the wait for
the first event (which decides the HTTP status), the events of a running request (`Run`:
its queue, its timeout, its cancellation when the client leaves), streamed answers that
cancel what still runs however they end (`StreamedResponse`), and OpenAI-shaped errors
(`ApiError`, `error_body`) with the JSON reading that produces them. The app and the
routes both import from here, never from each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, Protocol

import anyio
import msgspec
from fastapi import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

from mstar import events
from mstar.api_server.backend import Backend
from mstar.api_server.metrics import Metrics, RequestMetrics, status_of
from mstar.config.settings import ServerSettings
from mstar.errors import RequestError

log = logging.getLogger("mstar.api_server")

#: Seconds a client should wait before retrying a 429 or a 503 (starting; or stopping
#: after a part of the deployment died, for a supervisor to start it again).
RETRY_AFTER_S = 1
_DISCONNECT_POLL_S = 0.5  # how often a waiting non-streamed request checks its client
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}
RETRY_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}
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


def decode_json(raw: bytes | str, *, what: str = "the body",
                param: str | None = None) -> dict[str, Any]:
    """`raw` as a JSON object; a 400 naming `param` when it is not JSON, not an object, or
    nests deeper than `MAX_JSON_DEPTH`."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    check_json_depth(data, what=what, param=param)
    try:
        value = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"{what} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{what} must be a JSON object", param=param)
    return value


def check_json_depth(data: bytes, *, what: str, param: str | None) -> None:
    """A 400 naming `param` when the JSON in `data` nests deeper than `MAX_JSON_DEPTH`
    (a scan of the raw bytes: no parser recurses into it first)."""
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
                    headers=RETRY_HEADERS if status in (429, 503) else None)


class Caller(Protocol):
    """Who a request runs for: an HTTP request (`fastapi.Request`), or one frame of a
    WebSocket connection. `state.request_id` names it; `is_disconnected` says whether the
    client left (its request is then cancelled)."""

    state: Any

    async def is_disconnected(self) -> bool: ...


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

    async def next(self, request: Caller | None = None) -> events.Event:
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


class StreamedResponse(StreamingResponse):
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


@contextlib.contextmanager
def closed_on_failure(run: Run) -> Iterator[None]:
    """Cancel `run` when the block fails (a route setting up its answer); a client that
    left becomes a 499."""
    try:
        yield
    except ClientGone:
        run.close()
        raise ApiError(499, "the client closed the request") from None
    except BaseException:
        run.close()
        raise


class Runner:
    """Admission and the start of a request, shared by every route that runs one: refuse
    early, never queue (a deployment that cannot serve; one at its limit, counting the
    requests still being submitted so a flood never piles up there), then submit and wait
    for the first event, which decides the HTTP status."""

    def __init__(self, backend: Backend, settings: ServerSettings, metrics: Metrics):
        self.backend, self.settings, self.metrics = backend, settings, metrics
        self.limit = backend.model_info()["max_concurrent_requests"]
        self._admitting: set[str] = set()  # request ids being submitted

    def recorder(self, request: Caller) -> RequestMetrics:
        """The request's metrics recorder, made on first use; the middleware counts it
        when the response ends (routes take it first, so refusals count too)."""
        recorder = getattr(request.state, "recorder", None)
        if recorder is None:
            recorder = request.state.recorder = self.metrics.request()
        return recorder

    def admit(self) -> None:
        problem = self.backend.failed()
        if problem is not None:
            raise ApiError(503, f"the deployment cannot serve: {problem}", headers=RETRY_HEADERS)
        if not self.backend.ready():
            raise ApiError(503, "the deployment is starting; retry shortly", headers=RETRY_HEADERS)
        # a request being submitted counts once: the backend may have it already
        live = self.backend.live_requests()
        live += sum(not self.backend.is_live(rid) for rid in self._admitting)
        if live >= self.limit:
            raise ApiError(429, f"server busy: {self.limit} requests are running; retry "
                                "shortly", headers=RETRY_HEADERS)

    async def start(self, request: Caller, body: Mapping[str, Any], *,
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
                               headers=RETRY_HEADERS if exc.code == 429 else None) from None
            finally:
                self._admitting.discard(rid)
        except ApiError as exc:  # counted by its HTTP status (RequestMetrics.count)
            log.info("%s refused (%d): %s", rid, exc.status, exc.message)
            raise
        log.info("%s submitted (%s)", rid, kind)
        with closed_on_failure(run):
            first = await run.next(request)
        if isinstance(first, events.Error):
            run.close()
            raise error_event_error(first)
        return run, first


async def collect(run: Run, first: events.Event, request: Caller) -> list[events.Event]:
    """Every event of a non-streamed request, the last one `Finished` (an `Error` raises
    `ApiError`)."""
    collected = [first]
    while not terminal(collected[-1]):
        collected.append(await run.next(request))
    last = collected[-1]
    if isinstance(last, events.Error):
        raise error_event_error(last)
    return collected


__all__ = ["MAX_JSON_DEPTH", "RETRY_AFTER_S", "RETRY_HEADERS", "ApiError", "Caller",
           "ClientGone", "Run", "Runner", "StreamedResponse", "check_json_depth",
           "closed_on_failure", "collect", "decode_json", "error_body", "error_event_error",
           "error_response", "error_type", "event_status", "read_json", "terminal"]
