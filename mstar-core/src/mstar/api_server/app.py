"""The HTTP API server: FastAPI routes over a `Backend`.

`POST /generate` takes the model's request as JSON and answers with its collected events,
or streams them as SSE (`stream: true`); `/health`, `/v1/models` and `/metrics` describe the
deployment. The runtime delivers events from its own thread: each request has an asyncio
queue fed through `call_soon_threadsafe`, and whatever may block (the model's
`process_prompt`, a metrics scrape) runs in a worker thread, so the event loop never waits
on the runtime.

Response of a non-streamed `/generate` (200):
`{"id", "events": [every event as JSON, tagged by "event"], "finish_reason", "usage",
"text": [the concatenated text of each completion index], "outputs": {name: output},
"timing": {"total_ms", "first_output_ms"}}` (`text` only when the model produced text;
`outputs`: the tensors, audio and image by name, see `mstar.api_server.outputs`; `timing`:
ms from the server's receipt to the finish and to the first output, when there was one).
Bytes fields (audio samples, images, tensors) are base64, as msgspec writes them. With
`Accept: application/vnd.safetensors` the answer is instead one safetensors body of the
outputs, with `id`, `finish_reason`, `usage`, `timing` and `text` in its metadata. Streamed: one SSE frame per event, `event: <tag>` and `data: <event JSON>`,
then `data: [DONE]` after `finished`; an `error` event is the last frame instead. The
response status is decided by the first event, so a request that fails at once (rejected,
bad input found by a worker) gets its HTTP status even when streamed.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mstar import events
from mstar.api_server.backend import Backend
from mstar.api_server.forms import read_body
from mstar.api_server.inputs import attach_files, fetch_inputs
from mstar.api_server.metrics import Metrics
from mstar.api_server.openai_protocol import InvalidRequest
from mstar.api_server.outputs import (
    SAFETENSORS,
    collect_outputs,
    outputs_json,
    safetensors_body,
    wants_safetensors,
)
from mstar.api_server.request_flow import (
    RETRY_HEADERS,
    ApiError,
    ClientGone,
    Run,
    Runner,
    StreamedResponse,
    collect,
    error_response,
    terminal,
)
from mstar.api_server.schemas import (
    check_body,
    field_types,
    mstar_version,
    native_request_model,
    openapi_document,
    request_body,
)
from mstar.config.settings import ServerSettings
from mstar.model.fields import input_fields

log = logging.getLogger("mstar.api_server")

_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


class RequestIdMiddleware:
    """Gives every HTTP request and WebSocket connection an id (the client's `x-request-id`
    when sane, else a new one) that the runtime and every log line use, puts it on the
    response (a WebSocket route puts it on its handshake), logs one line per HTTP request
    (uvicorn's access log is off), and answers an unhandled exception with a 500
    carrying the id, never a trace. A request whose route took a metrics recorder
    (`Runner.recorder`) is counted here, just before its last byte leaves, under the status
    the client gets."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id")
        rid = given if given is not None and _SANE_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        if scope["type"] == "websocket":  # the route answers the handshake with the id
            await self.app(scope, receive, send)
            return
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
    """The API key guard: `Authorization: Bearer <key>`, or `Api-Key <key>` (as openpi's
    policy client sends it)."""
    expected = api_key.encode()

    async def require_key(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() not in ("bearer", "api-key") or not hmac.compare_digest(
                token.strip().encode(), expected):
            raise ApiError(401, "invalid or missing API key: send `Authorization: Bearer "
                                "<key>` (or `Api-Key <key>`)",
                           headers={"WWW-Authenticate": "Bearer"})

    return require_key


def _sse_frame(event: events.Event) -> bytes:
    tag = type(event).__struct_config__.tag
    return b"event: " + str(tag).encode() + b"\ndata: " + msgspec.json.encode(event) + b"\n\n"


def _text(collected: list[events.Event]) -> list[str]:
    """The concatenated text of each completion index ([] when there is none)."""
    texts: dict[int, list[str]] = {}
    for event in collected:
        if isinstance(event, events.TextDelta):
            texts.setdefault(event.index, []).append(event.text)
    return ["".join(texts.get(i, ())) for i in range(max(texts) + 1)] if texts else []


def _result(request_id: str, collected: list[events.Event], binary: bool,
            timing: dict[str, float]) -> Response:
    """The answer of a finished non-streamed request (see the module docstring): JSON, or
    the safetensors body when `binary`."""
    last = collected[-1]
    assert isinstance(last, events.Finished)
    outputs, text = collect_outputs(collected), _text(collected)
    if binary:
        usage = msgspec.to_builtins(last.usage)
        metadata: dict[str, Any] = {"id": request_id, "finish_reason": last.reason,
                                    "usage": usage, "timing": timing}
        if text:
            metadata["text"] = text
        return Response(safetensors_body(outputs, metadata), media_type=SAFETENSORS)
    out: dict[str, Any] = {"id": request_id, "events": collected,
                           "finish_reason": last.reason, "usage": last.usage,
                           "outputs": outputs_json(outputs), "timing": timing}
    if text:
        out["text"] = text
    return Response(msgspec.json.encode(out), media_type="application/json")


async def _sse(run: Run, first: events.Event) -> AsyncIterator[bytes]:
    event = first
    while True:
        yield _sse_frame(event)
        if terminal(event):
            break
        event = await run.next()
    if isinstance(event, events.Finished):
        yield b"data: [DONE]\n\n"


def create_app(backend: Backend, settings: ServerSettings) -> FastAPI:
    """The HTTP app over `backend`; `settings` gives the API key, the request timeout
    (seconds without an event before a request is cancelled with 504), the body limit and
    the media limits. Routes beyond `/generate` come from the model's capabilities (the
    OpenAI-compatible ones: `mstar.api_server.openai_routes`)."""
    from mstar.api_server.images_route import add_image_routes
    from mstar.api_server.openai_routes import add_openai_routes
    from mstar.api_server.plugin_routes import OwnPorts, add_plugin_routes
    from mstar.api_server.speech_route import add_speech_route
    from mstar.api_server.transcription_route import add_transcription_route

    info = backend.model_info()
    created = int(time.time())
    metrics = Metrics(backend.stats)
    runner = Runner(backend, settings, metrics)
    backend.use_media_limits(settings.media_limits())
    native = native_request_model(info)
    inputs = input_fields(native)
    form_types = {"stream": bool, **field_types(native)}
    app = FastAPI(title="mstar", version=mstar_version(), openapi_url=None, docs_url=None,
                  redoc_url=None)
    app.state.metrics = metrics  # routes added to the app count their requests with it
    app.state.own_ports = {}  # port -> the routes a plugin serves there too
    app.add_middleware(OwnPorts, listeners=app.state.own_ports)  # inside the request ids
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
                                headers=RETRY_HEADERS)
        if not backend.ready():
            return JSONResponse({"status": "starting"}, status_code=503, headers=RETRY_HEADERS)
        down = backend.degraded()  # a replica is out of rotation; the others serve
        if down is not None:
            return JSONResponse({"status": "degraded", "detail": down})
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
                  "(its `request_schema`), plus `stream` (SSE when true). Not streamed, the answer is "
                  "JSON, or one safetensors body of the outputs with `Accept: "
                  "application/vnd.safetensors`.", files=inputs))
    async def generate(request: Request) -> Response:
        rid = request.state.request_id
        clock = runner.recorder(request)  # from the request's receipt
        parsed = await read_body(request, settings.max_body_bytes, form_types)
        body = parsed.fields
        stream = body.pop("stream", False)  # the transport's option, not the model's
        if not isinstance(stream, bool):
            raise ApiError(400, "stream must be true or false", param="stream",
                           code="invalid_type")
        uploads = attach_files(body, parsed.files, inputs)
        if native is not None:
            check_body(native, body)
        runner.admit()  # before fetching media for a request that cannot run
        blobs = await fetch_inputs(body, uploads, inputs, settings.media_limits())
        run, first = await runner.start(request, body, blobs=blobs)
        if stream:
            return StreamedResponse(_sse(run, first), on_close=run.close)
        binary = wants_safetensors(request.headers.get("accept"))
        try:
            collected = await collect(run, first, request)
            return await anyio.to_thread.run_sync(_result, rid, collected, binary,
                                                  clock.timing())
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request is cancelled
        finally:
            run.close()

    add_openai_routes(guarded, runner, info, settings)
    add_speech_route(guarded, runner, info, settings)
    add_transcription_route(guarded, runner, info, settings)
    add_image_routes(app, guarded, runner, info, settings)
    add_plugin_routes(app, guarded, runner, info, settings)  # the model's plugin's own
    app.include_router(guarded)
    return app


__all__ = ["RequestIdMiddleware", "create_app", "new_request_id"]
