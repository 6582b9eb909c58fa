"""Routes a plugin adds for its model (`mstar_register_routes`), on core's request plumbing.

A protocol that belongs to one model family (a robot policy's websocket, a world model's
rollout API) lives in its plugin, but what every route needs stays here, once: the API
key, request ids, the body limit, 400s naming the field, admission and submission
(`Runner`), metrics, and cancellation when the client leaves. A plugin's route set is
served only when the model declares the capability it names (`RouteSet.capability`);
its `add(context)` gets a `RouteContext` and adds routes with it:

- `context.post(path, schema, handler)`: a JSON route behind the API key. The body
  (within `max_body_bytes`) is checked against the pydantic `schema`; `handler(caller,
  parsed)` returns the answer's fields, sent as JSON with the request's `id`.
- `context.websocket(path, schema, handler, hello=..., codec=..., port=...)`: a WebSocket
  route. The API key is checked at connect (a wrong one gets the HTTP 401 before any
  upgrade); the handshake's answer carries the connection's `x-request-id`. `hello` (if
  not None, even empty: openpi's clients wait for their metadata) is the first frame;
  then each frame is one request, id `<connection id>-<n>`, answered by one frame. The
  `codec` (a `FrameCodec`) says how frames are read and written; the default,
  `MsgpackFrames`, takes binary msgpack maps and answers `{"id", **fields}` or `{"id",
  "error": ...}`. A bad frame is answered with the codec's error
  frame and does not end the connection; more than `MAX_FRAMES_AHEAD` frames waiting for
  their answers does, with 1008. Each frame is counted in the metrics like an HTTP
  request, and a client that leaves cancels the request it was waiting for. `port`: the
  route is also served on a listener of its own (the server's host, that port; at its
  path and at "/", as robot clients that know only `ws://host:port` connect, beside
  `GET /healthz`), in the same process and event loop as the app and behind the same API
  key (`own_ports` gives the launcher what to listen on).

Inside a handler, `context.generate(caller, body)` runs one request of the model's own
`/generate` body (checked against its `request_schema` like `/generate`) and returns its
events, the last one `Finished`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
from fastapi import APIRouter, FastAPI, Request, WebSocket
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, Router, WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose, WebSocketDisconnect

from mstar import events
from mstar.api_server import openai_protocol as oai
from mstar.api_server.request_flow import (
    ApiError,
    Caller,
    ClientGone,
    Runner,
    collect,
    error_body,
    error_response,
    read_json,
)
from mstar.api_server.schemas import check_body, native_request_model, request_body
from mstar.plugins import model_routes

if TYPE_CHECKING:
    from mstar.api_server.backend import ModelInfo
    from mstar.config.settings import ServerSettings

log = logging.getLogger("mstar.api_server")

S = TypeVar("S", bound=BaseModel)
#: WebSocket close codes (RFC 6455): a policy violation; a server error.
WS_POLICY_VIOLATION, WS_INTERNAL_ERROR = 1008, 1011
#: Frames a client may send ahead of their answers (more: the connection is closed), so
#: what a connection holds stays bounded.
MAX_FRAMES_AHEAD = 4


Handler = Callable[[Caller, S], Awaitable[Mapping[str, Any]]]


class FrameCodec(Protocol):
    """A WebSocket route's wire format (a robot protocol's framing): how a frame becomes
    a request body (`decode`: an `ApiError` 400 for a bad frame), how an answer and an
    error (`status`, the OpenAI-shaped `{"error": {...}}` body) become a frame (bytes: a
    binary frame, str: a text frame), and whether answers carry the frame's `id`."""

    answers_carry_id: bool

    def decode(self, frame: bytes | str) -> dict[str, Any]: ...

    def encode(self, answer: Mapping[str, Any]) -> bytes | str: ...

    def error(self, status: int, body: Mapping[str, Any]) -> bytes | str: ...


class MsgpackFrames:
    """The default framing: a binary msgpack map per frame, answers and errors as msgpack
    maps carrying the frame's id."""

    answers_carry_id = True

    def decode(self, frame: bytes | str) -> dict[str, Any]:
        if not isinstance(frame, bytes):
            raise ApiError(400, "this route takes msgpack in binary frames")
        try:
            value = msgspec.msgpack.decode(frame)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the frame is not valid msgpack: {exc}") from None
        if not isinstance(value, dict):
            raise ApiError(400, "the frame must be a msgpack map")
        return value

    def encode(self, answer: Mapping[str, Any]) -> bytes:
        return msgspec.msgpack.encode(answer)

    def error(self, status: int, body: Mapping[str, Any]) -> bytes:
        return msgspec.msgpack.encode(body)


class _Frame:
    """One frame of a WebSocket connection as a `Caller`: the client left when the
    connection did."""

    def __init__(self, request_id: str, gone: asyncio.Event):
        # as a request's state: `Runner.recorder` keeps the frame's recorder here
        self.state = SimpleNamespace(request_id=request_id, recorder=None)
        self._gone = gone

    async def is_disconnected(self) -> bool:
        return self._gone.is_set()


class RouteContext:
    """What core gives a plugin's route set, and nothing more: the served model (`model`:
    name, capabilities, limits), the server's `settings`, and the ways to add routes
    (`post`, `websocket`) and to run requests (`generate`)."""

    def __init__(self, app: FastAPI, router: APIRouter, runner: Runner, model: ModelInfo,
                 settings: ServerSettings):
        self.model, self.settings = model, settings
        self._app, self._router, self._runner = app, router, runner
        self._native = native_request_model(model)

    async def generate(self, caller: Caller, body: dict[str, Any]) -> list[events.Event]:
        """Run one request of the model's `/generate` body to its end: its events, the last
        one `Finished`. A body the model's `request_schema` refuses, a refusal at admission
        or a failed request raise `ApiError`; a client that leaves cancels it (499)."""
        if self._native is not None:
            check_body(self._native, body)
        run, first = await self._runner.start(caller, body)
        try:
            return await collect(run, first, caller)
        except ClientGone:
            raise ApiError(499, "the client closed the request") from None
        finally:
            run.close()

    def post(self, path: str, schema: type[S], handler: Handler[S], *,
             description: str) -> None:
        """Add `POST path` (see the module docstring); `description` documents its body in
        the OpenAPI document."""

        async def route(request: Request) -> Response:
            self._runner.recorder(request)  # refusals count too
            body = oai.parse(schema, await read_json(request, self.settings.max_body_bytes))
            answer = {"id": request.state.request_id, **await handler(request, body)}
            return Response(msgspec.json.encode(answer), media_type="application/json")

        self._router.add_api_route(path, route, methods=["POST"], name=_name(path),
                                   openapi_extra=request_body(schema, description))

    def websocket(self, path: str, schema: type[S], handler: Handler[S], *,
                  hello: Mapping[str, Any] | None = None, codec: FrameCodec | None = None,
                  port: int | None = None) -> None:
        """Add the WebSocket route `path` (see the module docstring); `codec`: its
        framing (None: `MsgpackFrames`); `port`: serve it on that port too."""
        guards = [d.dependency for d in self._router.dependencies if d.dependency]
        frames = codec or MsgpackFrames()

        async def route(websocket: WebSocket) -> None:
            # FastAPI resolves a router's dependencies with a Request, which a WebSocket is
            # not: the guards (the API key) run here, on the handshake's headers
            try:
                for guard in guards:
                    await guard(websocket)
            except ApiError as exc:
                await _deny(websocket, exc)
                return
            session = _Session(websocket, self._runner, self.settings.max_body_bytes, schema,
                               handler, frames)
            await session.serve(None if hello is None else dict(hello))

        self._app.add_api_websocket_route(path, route, name=_name(path))
        if port is not None:
            self._listen(port, path, route)

    def _listen(self, port: int, path: str, route: Callable[[WebSocket], Awaitable[None]]
                ) -> None:
        """Serve `route` on its own `port`: at `path` and "/", with `GET /healthz`."""
        listeners = self._app.state.own_ports
        if port == self.settings.port or port in listeners:
            raise ValueError(f"websocket {path}: port {port} already serves "
                             f"{'the API' if port == self.settings.port else 'another route'}")
        routes = [WebSocketRoute(p, route) for p in dict.fromkeys((path, "/"))]
        listeners[port] = Router([*routes, Route("/healthz", _healthz, methods=["GET"])],
                                 default=_not_found)


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("OK\n")  # as openpi's policy server answers


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """What a route's own port answers for anything else (an HTTP exception raised there
    would not reach the app's handlers)."""
    if scope["type"] == "websocket":
        await WebSocketClose()(scope, receive, send)
        return
    await error_response(404, f"no route for {scope['method']} {scope['path']} on this "
                              "port")(scope, receive, send)


class OwnPorts:
    """ASGI middleware sending what arrived on a route's own port (`websocket(...,
    port=)`) to that port's routes, and everything else to the app. It sits inside the
    request-id middleware, so ids, logs and metrics are the same on every port."""

    def __init__(self, app: ASGIApp, listeners: Mapping[int, ASGIApp]):
        self.app, self.listeners = app, listeners

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or (None, None)
        target = self.listeners.get(server[1]) if scope["type"] in ("http", "websocket") \
            else None
        await (target or self.app)(scope, receive, send)


def own_ports(app: FastAPI) -> list[int]:
    """The ports plugin routes asked to be served on besides the app's own."""
    return sorted(app.state.own_ports)


def _name(path: str) -> str:
    return "plugin" + path.replace("/", "_")


async def _deny(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse a handshake with the HTTP error (where the server can send one), else close
    with 1008 (policy violation)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        body = msgspec.json.encode(error_body(exc.status, exc.message, param=exc.param))
        await websocket.send_denial_response(Response(
            body, status_code=exc.status, headers=exc.headers, media_type="application/json"))
    else:
        await websocket.close(code=WS_POLICY_VIOLATION, reason=exc.message[:120])


class _Session:
    """One WebSocket connection: a reader task takes the client's frames (and notices when
    it leaves), the loop answers them one at a time."""

    def __init__(self, websocket: WebSocket, runner: Runner, limit: int,
                 schema: type[BaseModel], handler: Handler[Any], codec: FrameCodec):
        self.ws, self.runner, self.limit = websocket, runner, limit
        self.schema, self.handler, self.codec = schema, handler, codec
        self.id = websocket.state.request_id  # the client's x-request-id, or a new one
        self.gone = asyncio.Event()
        self.inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue()

    async def serve(self, hello: dict[str, Any] | None) -> None:
        await self.ws.accept(headers=[(b"x-request-id", self.id.encode())])
        log.info("%s websocket %s connected", self.id, self.ws.url.path)
        reader = asyncio.create_task(self._read())
        try:
            if hello is not None:
                await self._send(self.codec.encode(hello))
            count = 0
            while (frame := await self.inbox.get()) is not None:
                count += 1
                if not await self._answer(frame, _Frame(f"{self.id}-{count}", self.gone)):
                    break
        except WebSocketDisconnect:
            pass  # the client left while we answered
        except Exception:
            if not self.gone.is_set():  # else: a send raced the client's leaving
                log.exception("%s websocket %s: unhandled error", self.id, self.ws.url.path)
                with contextlib.suppress(Exception):
                    await self.ws.close(code=WS_INTERNAL_ERROR)
        finally:
            reader.cancel()
            log.info("%s websocket %s closed", self.id, self.ws.url.path)

    async def _read(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if self.inbox.qsize() >= MAX_FRAMES_AHEAD:
                    log.info("%s: more than %d frames ahead of their answers: closed",
                             self.id, MAX_FRAMES_AHEAD)
                    await self.ws.close(WS_POLICY_VIOLATION, f"more than {MAX_FRAMES_AHEAD} "
                                        "frames ahead of their answers")
                    break
                data = message.get("bytes")
                self.inbox.put_nowait(data if data is not None else message.get("text", ""))
        finally:
            self.gone.set()
            self.inbox.put_nowait(None)

    async def _answer(self, frame: str | bytes, caller: _Frame) -> bool:
        """Answer one frame; False when the client has left."""
        rid = caller.state.request_id
        recorder = self.runner.recorder(caller)
        ids = {"id": rid} if self.codec.answers_carry_id else {}
        status, error = 200, None
        try:
            if len(frame) > self.limit:
                raise ApiError(413, f"frame of {len(frame)} bytes is over the limit of "
                                    f"{self.limit} bytes")
            parsed = oai.parse(self.schema, self.codec.decode(frame))
            answer = await self.handler(caller, parsed)
        except ApiError as exc:
            status, error = exc.status, error_body(exc.status, exc.message, param=exc.param,
                                                   code=exc.code)
        except oai.InvalidRequest as exc:
            status, error = 400, error_body(400, str(exc), param=exc.param, code=exc.code)
        except Exception:
            recorder.count(500)
            raise
        if self.gone.is_set():
            recorder.count(499)
            return False
        out = self.codec.encode({**ids, **answer}) if error is None else \
            self.codec.error(status, {**ids, **error})
        recorder.count(status)  # before the answer leaves, as the middleware counts HTTP
        await self._send(out)
        log.info("%s -> %d", rid, status)
        return True

    async def _send(self, frame: bytes | str) -> None:
        if isinstance(frame, str):
            await self.ws.send_text(frame)
        else:
            await self.ws.send_bytes(frame)


def add_plugin_routes(app: FastAPI, router: APIRouter, runner: Runner, info: ModelInfo,
                      settings: ServerSettings) -> None:
    """Add the route sets of the served model's plugin whose capability it declares: HTTP
    routes on `router` (the API-key-guarded one), WebSocket routes on `app` (checking the
    router's guards themselves). A route whose method and path the app already serves is
    refused at start, naming the plugin."""
    context = RouteContext(app, router, runner, info, settings)
    for route_set in model_routes(info["name"]):
        if route_set.capability not in info["capabilities"]:
            continue
        before = _routes(app, router)
        served = {key for route in before for key in _keys(route)}
        route_set.add(context)
        added = [r for r in _routes(app, router) if not any(r is b for b in before)]
        clashes = sorted({key for route in added for key in _keys(route)} & served)
        if clashes:
            raise ValueError(f"{route_set.owner} (capability {route_set.capability!r}) adds "
                             f"routes the app already serves: {clashes}")
        log.info("routes of %s (capability %s): %s", route_set.owner, route_set.capability,
                 ", ".join(sorted(r.path for r in added)))


def _routes(app: FastAPI, router: APIRouter) -> list[Any]:
    return list(router.routes) + list(app.router.routes)


def _keys(route: Any) -> set[tuple[str, str]]:
    """(method, path) of a route; a WebSocket route's method is "WEBSOCKET"."""
    return {(method, route.path) for method in getattr(route, "methods", None) or
            {"WEBSOCKET"}}


__all__ = ["Caller", "FrameCodec", "MsgpackFrames", "OwnPorts", "RouteContext",
           "add_plugin_routes", "own_ports"]
