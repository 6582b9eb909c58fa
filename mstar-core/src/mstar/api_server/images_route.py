"""OpenAI's image routes over any model with the capabilities "images"
(`POST /v1/images/generations`, JSON) and "image_edits" (`POST /v1/images/edits`, OpenAI's
multipart form: `image` (or `image[]`), `prompt`, `n`, `size`, `response_format`, `model`).

The route calls the model's request path as `/generate` would, with the native request
`{"prompt", "mode": "image", "n", "width", "height", **extra}`: `size` "WxH" gives width and
height, "auto" or no size leaves both to the model; fields OpenAI does not define (`seed`,
`cfg_text_scale`, ...) pass through as model fields, checked against the model's
`request_schema`. An edit adds `image`, its uploaded file taken as `/generate` takes a file
part of an `ImageInput` field (the data worker decodes it, so the model sees the same image
type; a file that is no image is a 400 naming `image`, one over `--media-max-bytes` a 413).
One image per edit: more is a 400, and `mask` is refused ("not supported"). The model
answers with `events.Image` PNGs (`index` = the image's number); the answer is OpenAI's
`{"created", "data": [{"b64_json"} | {"url"}, ...]}` in index order. The model's own
validation (sizes it cannot make, listed in its message; too many images; ranges) comes
back as a 400 naming the field, `width`/`height` as `size`.

`response_format: "url"` keeps the PNGs in a store of their own under `--upload-dir` and
answers URLs (`GET /v1/images/files/<token>/<i>.png`) that serve them for
`--image-url-ttl` seconds, then 404; with a TTL of 0 url output is off (a 400 saying so).
The URLs carry 128 random bits and need no API key, so they can be handed to a browser.
A client that leaves while its images are made cancels the request.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mstar import events
from mstar.api_server import openai_protocol as oai
from mstar.api_server.forms import FilePart, is_multipart, read_body
from mstar.api_server.inputs import attach_files, fetch_inputs
from mstar.api_server.openai_routes import lacks
from mstar.api_server.request_flow import ApiError, ClientGone, Runner, collect, read_json
from mstar.api_server.schemas import check_body, field_types, native_request_model, request_body
from mstar.model.fields import InputField

if TYPE_CHECKING:
    from mstar.api_server.backend import ModelInfo
    from mstar.config.settings import ServerSettings
    from mstar.media import MediaLimits

#: The edit's image, as `/generate` takes an `ImageInput` field.
_IMAGE_FIELD = {"image": InputField("image")}
_FILES_PATH = "/v1/images/files"
#: The native fields the route sets from OpenAI's, which extra fields may not.
_SET_BY_ROUTE = {"mode": '"image"', "width": "from size", "height": "from size",
                 "image": "the file part of an edit"}
#: Where the model's own errors name what the client sent as `size`.
_SIZE_PARAMS = ("width", "height")


def _named_as_sent(exc: ApiError | oai.InvalidRequest) -> None:
    """Name the field of a model's error as the client sent it (`size`, not `width`)."""
    if exc.param in _SIZE_PARAMS:
        exc.param = "size"


class ImageRequest(BaseModel):
    """OpenAI's image generation (and edit) request; other fields pass to the model."""

    model_config = ConfigDict(extra="allow")
    model: str | None = Field(None, description="The served model (omitted: it).")
    prompt: str
    n: int = Field(1, ge=1, description="Images to make (the model sets the most).")
    size: str | None = Field(None, description='"WxH" or "auto" (the model\'s default).')
    response_format: Literal["b64_json", "url"] = "b64_json"
    stream: bool = False
    user: str | None = None  # accepted and ignored, as on the chat routes


def _size(size: str | None) -> dict[str, int]:
    """`{"width", "height"}` of a "WxH" size; {} for none or "auto"."""
    if size is None or size == "auto":
        return {}
    width, x, height = size.partition("x")
    if not (x and width.isdigit() and height.isdigit() and int(width) and int(height)):
        raise ApiError(400, f"size {size!r} is not \"WxH\" (e.g. \"1024x1024\") or \"auto\"",
                       param="size")
    return {"width": int(width), "height": int(height)}


def native_request(req: ImageRequest) -> dict[str, Any]:
    """The model's request: the wire contract in the module docstring."""
    if not req.prompt.strip():
        raise ApiError(400, "prompt must be non-empty text", param="prompt")
    if req.stream:
        raise ApiError(400, "streaming (partial images) is not supported", param="stream")
    extra = req.model_extra or {}
    for name in _SET_BY_ROUTE:
        if name in extra:
            raise ApiError(400, f"{name} is set by the route ({_SET_BY_ROUTE[name]}), not "
                                "given", param=name)
    return {"prompt": req.prompt, "mode": "image", "n": req.n, **_size(req.size),
            **extra}


class ImageFiles:
    """Generated PNGs served by URL for `ttl` seconds: each answer's images under a random
    token in an `UploadStore` of their own, dropped once expired (when asked for, and at
    each new answer). `clock`: monotonic seconds (a test moves it)."""

    def __init__(self, root: Path, ttl: float, limits: MediaLimits,
                 clock: Callable[[], float] = time.monotonic):
        from mstar.media import UploadStore

        self.store = UploadStore(root, limits)
        self.store.purge()  # what an earlier server of this process id left
        self.ttl, self.clock = ttl, clock
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, images: list[bytes]) -> str:
        """Keep `images` (as `<i>.png`) and return their token."""
        self.sweep()
        token = secrets.token_hex(16)
        for i, data in enumerate(images):
            self.store.save(token, f"{i}.png", data)
        with self._lock:
            self._expiry[token] = self.clock() + self.ttl
        return token

    def read(self, token: str, name: str) -> bytes | None:
        """The PNG `name` of `token`, or None when there is none or it expired."""
        from mstar.media import MediaError

        with self._lock:
            expires = self._expiry.get(token)
        if expires is None or self.clock() >= expires:
            self.sweep()
            return None
        try:
            return self.store.read(token, name)
        except MediaError:
            return None

    def sweep(self) -> None:
        """Delete every expired answer's images."""
        now = self.clock()
        with self._lock:
            gone = [token for token, expires in self._expiry.items() if now >= expires]
            for token in gone:
                del self._expiry[token]
        for token in gone:
            self.store.release(token)


def add_image_routes(app: FastAPI, router: APIRouter, runner: Runner, info: ModelInfo,
                     settings: ServerSettings) -> None:
    """Add the generation and edit routes to `router` (each refusing with a 400 when the
    model lacks its capability) and the image files' GET route to `app` (no API key: the
    URL is the secret)."""
    served = info["name"]
    capabilities = set(info["capabilities"])
    native = native_request_model(info) if capabilities & {"images", "image_edits"} else None
    form_types = field_types(ImageRequest)
    limits = settings.media_limits()
    files: list[ImageFiles] = []  # made on the first url answer

    def image_files() -> ImageFiles:
        if not files:  # one directory per API server process: each purges its own
            files.append(ImageFiles(Path(settings.upload_dir) / f"images-{os.getpid()}",
                                    settings.image_url_ttl, limits))
        return files[0]

    def parsed(fields: dict[str, Any]) -> ImageRequest:
        req = oai.parse(ImageRequest, fields)
        if req.model is not None and req.model != served:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server "
                                f"serves {served!r}", param="model", code="model_not_found")
        if req.response_format == "url" and settings.image_url_ttl <= 0:
            raise ApiError(400, "url output is not enabled on this server (--image-url-ttl "
                                "is 0); ask for b64_json", param="response_format")
        return req

    async def answer(request: Request, req: ImageRequest, body: dict[str, Any],
                     blobs: list[bytes]) -> Response:
        created = int(time.time())
        try:
            run, first = await runner.start(request, body, blobs=blobs)
        except ApiError as exc:
            _named_as_sent(exc)
            raise
        try:
            collected = await collect(run, first, request)
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; the request is cancelled
        finally:
            run.close()
        images = sorted((e for e in collected if isinstance(e, events.Image)),
                        key=lambda e: e.index)
        if not images:
            raise ApiError(500, f"the model finished ({collected[-1].reason}) without an "
                                "image")
        if req.response_format == "url":
            token = image_files().add([image.data for image in images])
            base = str(request.base_url).rstrip("/") + _FILES_PATH
            data = [{"url": f"{base}/{token}/{i}.png"} for i in range(len(images))]
        else:
            data = [{"b64_json": base64.b64encode(image.data).decode()} for image in images]
        return Response(msgspec.json.encode({"created": created, "data": data}),
                        media_type="application/json")

    def checked(body: dict[str, Any]) -> None:
        if native is None:
            return
        try:
            check_body(native, body)
        except oai.InvalidRequest as exc:
            _named_as_sent(exc)
            raise

    @router.post("/v1/images/generations", openapi_extra=request_body(
        ImageRequest, "OpenAI's image generation request; other fields are the model's.",
        served=served))
    async def generations(request: Request) -> Response:
        runner.recorder(request)
        if "images" not in capabilities:
            raise lacks(info, "images", "POST /v1/images/generations")
        req = parsed(await read_json(request, settings.max_body_bytes))
        body = native_request(req)
        checked(body)
        return await answer(request, req, body, [])

    @router.post("/v1/images/edits", openapi_extra={"requestBody": {
        "required": True, "description": "OpenAI's image edit form: `image` (one file), "
        "`prompt`, `n`, `size`, `response_format`, `model`; other fields are the model's.",
        "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}}}}}}})
    async def edits(request: Request) -> Response:
        runner.recorder(request)
        if "image_edits" not in capabilities:
            raise lacks(info, "image_edits", "POST /v1/images/edits")
        if not is_multipart(request):
            raise ApiError(400, "an image edit is a multipart/form-data body (the image as "
                                "the file part `image`)", param="image")
        form = await read_body(request, settings.max_body_bytes, form_types)
        if "mask" in form.fields or any(part.name == "mask" for part in form.files):
            raise ApiError(400, "mask is not supported: the model edits the whole image",
                           param="mask")
        images = [part for part in form.files if part.name in ("image", "image[]")]
        others = [part.name for part in form.files if part.name not in ("image", "image[]")]
        if others:
            raise ApiError(400, f"unknown file part {others[0]!r}; an edit takes the file "
                                "part `image`", param=others[0])
        if not images:
            raise ApiError(400, "an image edit needs the image: the file part `image`",
                           param="image")
        if len(images) > 1:
            raise ApiError(400, f"got {len(images)} images; model {served!r} edits one",
                           param="image")
        req = parsed(form.fields)
        body = native_request(req)
        part = images[0]
        uploads = attach_files(body, [FilePart("image", part.filename or "image",
                                               part.content_type, part.data)], _IMAGE_FIELD)
        checked(body)
        runner.admit()  # before taking the upload for a request that cannot run
        blobs = await fetch_inputs(body, uploads, _IMAGE_FIELD, limits)
        return await answer(request, req, body, blobs)

    @app.get(_FILES_PATH + "/{token}/{name}")
    async def image_file(token: str, name: str) -> Response:
        data = image_files().read(token, name) if files else None
        if data is None:
            raise ApiError(404, "no such image: it expired or never existed "
                                f"(images stay {settings.image_url_ttl:g} s)")
        return Response(data, media_type="image/png")


__all__ = ["ImageFiles", "ImageRequest", "add_image_routes", "native_request"]
