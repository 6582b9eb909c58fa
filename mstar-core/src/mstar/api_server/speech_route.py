"""OpenAI's `POST /v1/audio/speech` over any model with the capability "speech".

Such a model takes the native fields `input` (the text) and `voice` (None: its default;
it refuses an unknown voice itself, listing its voices) plus the sampling fields, and
emits `AudioChunk`s. The route turns OpenAI's request into that native request, waits for
the first chunk (so a request that fails before any audio still gets its HTTP status, and
the response can state the sample rate), then encodes the chunks as they come
(`mstar.media.audio_out`):
- `stream_format: "audio"` (OpenAI's default): the file's bytes as a chunked response,
  in a form that plays while it streams (see `audio_out` for each format). An error after
  the first bytes cuts the connection, so a client never takes a truncated file for a
  whole one.
- `stream_format: "sse"`: `data: {"type": "speech.audio.delta", "audio": <base64>}` per
  piece of the same file, then `{"type": "speech.audio.done", "usage": {"input_tokens",
  "output_tokens", "total_tokens"}}`; an error is one `data: {"error": ...}` frame.
The response header `x-sample-rate` carries the encoded audio's rate (pcm has no header).

`speed` (0.25 to 4) is honoured with a pitch-keeping time stretch. `instructions` (voice
direction) is refused: no model here takes it. The route is always registered: on a model
without "speech" it answers 400 naming the capabilities the model has. vLLM-style
sampling fields (`max_tokens`, `temperature`, `seed`, ...) pass through to the model;
those left out keep the model's defaults. The native request is checked against the
model's `request_schema` before it runs, so a bad `voice` is a 400 naming it; a text too
long for the model names `input`. A model that ends without any audio is answered by why
(`max_tokens` ran out: 400 naming it; it stopped at once: 400 naming `input`).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mstar import events
from mstar.api_server import openai_protocol as oai
from mstar.api_server.openai_routes import check_model, lacks
from mstar.api_server.request_flow import (
    ApiError,
    Run,
    Runner,
    StreamedResponse,
    closed_on_failure,
    error_body,
    error_event_error,
    event_status,
    read_json,
)
from mstar.api_server.schemas import check_body, native_request_model, request_body
from mstar.media.audio_out import (
    FORMATS,
    SPEED_RANGE,
    AudioEncoder,
    chunk_samples,
    media_type,
)

if TYPE_CHECKING:
    from mstar.api_server.backend import ModelInfo
    from mstar.config.settings import ServerSettings

STREAM_FORMATS = ("audio", "sse")
#: Sampling fields passed to the model's native request when given.
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
             "repetition_penalty", "frequency_penalty", "presence_penalty")


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus vLLM's sampling extensions."""

    model_config = ConfigDict(extra="forbid")
    model: str
    input: str
    voice: str | None = None
    instructions: str | None = None
    # str, checked by parse_speech (its 400 lists the choices); the schema states them
    response_format: str = Field("mp3", json_schema_extra={"enum": list(FORMATS)})
    speed: float = Field(1.0, ge=SPEED_RANGE[0], le=SPEED_RANGE[1])
    stream_format: str = Field("audio", json_schema_extra={"enum": list(STREAM_FORMATS)})
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    ignore_eos: bool = False


def parse_speech(body: dict[str, Any]) -> SpeechRequest:
    """The request, or `oai.InvalidRequest` naming the first bad field."""
    req = oai.parse(SpeechRequest, body)
    if not req.input.strip():
        raise oai.InvalidRequest("input must be non-empty text", "input")
    if req.response_format not in FORMATS:
        raise oai.InvalidRequest(f"response_format {req.response_format!r} is not supported; "
                                 f"supported: {', '.join(FORMATS)}", "response_format")
    if req.stream_format not in STREAM_FORMATS:
        raise oai.InvalidRequest(f"stream_format {req.stream_format!r} is not supported; "
                                 f"supported: {', '.join(STREAM_FORMATS)}", "stream_format")
    if req.instructions and req.instructions.strip():
        raise oai.InvalidRequest("instructions are not supported", "instructions")
    return req


def native_request(req: SpeechRequest) -> dict[str, Any]:
    """The model's own request: `input`, and `voice` and the sampling fields where given
    (the rest are the model's defaults: a speech model knows its budget of tokens and its
    sampling better than a route could)."""
    out: dict[str, Any] = {"input": req.input}
    if req.voice is not None:
        out["voice"] = req.voice
    for name in _SAMPLING:
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    if req.ignore_eos:
        out["ignore_eos"] = True
    return out


class _Failed(Exception):
    """The request failed after its audio began."""

    def __init__(self, event: events.Error):
        super().__init__(f"{event.message} (status {event_status(event)})")
        self.event = event


def _no_audio(done: events.Finished, req: SpeechRequest) -> ApiError:
    """Why a request finished before any audio, as the client's error."""
    message = f"the model finished ({done.reason}) without any audio"
    if done.reason == "length":
        return ApiError(400, f"{message}: max_tokens={req.max_tokens} is too few for one "
                             "frame", param="max_tokens")
    status = {"timeout": 504, "abort": 499, "error": 500}.get(done.reason, 400)
    return ApiError(status, message, param="input" if status == 400 else None)


async def _first_audio(run: Run, first: events.Event, request: Request,
                       no_audio: Callable[[events.Finished], ApiError]) -> events.AudioChunk:
    """The first audio chunk; what ends the request before it is an `ApiError`."""
    event = first
    while not (isinstance(event, events.AudioChunk) and event.index == 0):
        if isinstance(event, events.Error):
            raise error_event_error(event)
        if isinstance(event, events.Finished):
            raise no_audio(event)
        event = await run.next(request)
    return event


async def _encoded(run: Run, first: events.AudioChunk,
                   encoder: AudioEncoder) -> AsyncIterator[bytes | events.Finished]:
    """The encoded pieces as the chunks arrive, then the `Finished` event; an `Error`
    raises `_Failed`."""
    event: events.Event = first
    while True:
        if isinstance(event, events.AudioChunk) and event.index == 0:
            if event.sample_rate != encoder.input_rate:
                raise _Failed(events.Error(
                    f"the model changed its sample rate mid-stream ({encoder.input_rate} "
                    f"to {event.sample_rate} Hz)"))
            piece = encoder.encode(chunk_samples(event))
            if piece:
                yield piece
        elif isinstance(event, events.Finished):
            yield encoder.finish()
            yield event
            return
        elif isinstance(event, events.Error):
            raise _Failed(event)
        event = await run.next()


async def _audio_body(pieces: AsyncIterator[bytes | events.Finished]) -> AsyncIterator[bytes]:
    async for piece in pieces:
        if isinstance(piece, bytes) and piece:
            yield piece


def _frame(data: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


async def _sse_body(pieces: AsyncIterator[bytes | events.Finished]) -> AsyncIterator[bytes]:
    try:
        async for piece in pieces:
            if isinstance(piece, events.Finished):
                usage = piece.usage
                yield _frame({"type": "speech.audio.done", "usage": {
                    "input_tokens": usage.prompt_tokens,
                    "output_tokens": usage.completion_tokens,
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens}})
            elif piece:
                yield _frame({"type": "speech.audio.delta",
                              "audio": base64.b64encode(piece).decode()})
    except _Failed as exc:
        event = exc.event
        yield _frame(error_body(event_status(event), event.message, param=event.param))


def add_speech_route(router: APIRouter, runner: Runner, info: ModelInfo,
                     settings: ServerSettings) -> None:
    """Add `POST /v1/audio/speech` to `router` (whatever the model's capabilities: one
    without "speech" is told so with a 400)."""
    served = info["name"]
    native = native_request_model(info) if "speech" in info["capabilities"] else None

    @router.post("/v1/audio/speech", openapi_extra=request_body(
        SpeechRequest, "OpenAI's speech request, plus vLLM's sampling fields.",
        served=served))
    async def speech(request: Request) -> Response:
        runner.recorder(request)
        if "speech" not in info["capabilities"]:
            raise lacks(info, "speech", "POST /v1/audio/speech")
        req = parse_speech(await read_json(request, settings.max_body_bytes))
        check_model(req.model, served)
        body = native_request(req)
        if native is not None:
            check_body(native, body)
        try:
            run, first = await runner.start(request, body)
        except ApiError as exc:
            if exc.param == "prompt":  # the prompt the model built from `input`
                exc.param = "input"
            raise
        with closed_on_failure(run):
            chunk = await _first_audio(run, first, request, lambda done: _no_audio(done, req))
            # FLAC comes whole, at the end: streamed, its length is "unknown", which
            # libsndfile (soundfile) readers cannot read; the other formats stream
            encoder = AudioEncoder(req.response_format, chunk.sample_rate, speed=req.speed,
                                   seekable=req.response_format == "flac")

        def close() -> None:
            run.close()
            encoder.close()

        pieces = _encoded(run, chunk, encoder)
        sse = req.stream_format == "sse"
        # on_close cancels the request however the response ends (the client gone too)
        response = StreamedResponse(_sse_body(pieces) if sse else _audio_body(pieces), close,
                                    media_type="text/event-stream" if sse
                                    else media_type(req.response_format))
        response.headers["x-sample-rate"] = str(encoder.sample_rate)
        return response


__all__ = ["STREAM_FORMATS", "SpeechRequest", "add_speech_route", "native_request",
           "parse_speech"]
