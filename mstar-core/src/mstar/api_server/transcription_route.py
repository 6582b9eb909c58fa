"""OpenAI's `POST /v1/audio/transcriptions` over any model with the capability
"transcription".

The body is OpenAI's multipart form (`forms.read_body`, as `audio.transcriptions.create`
sends it): `file` (the audio, required), `model`, `response_format` (`json`, the default:
`{"text", "usage"}`; `text`: the text alone, as text/plain), `language`, `prompt`,
`temperature` (OpenAI's default 0), `stream` (SSE: `transcript.text.delta` events, then
`transcript.text.done` with the whole text and `usage`). `srt`, `vtt` and `verbose_json`
need timestamps, and so does `timestamp_granularities`: no model here gives them and this
route does not invent them, so each is a 400 naming its field. vLLM's sampling extras
(`max_completion_tokens`, `seed`, `top_p`, ...) pass through to the model.

The data worker decodes the file at the model's input rate (`kind="transcription"`; a
file that is no audio is a 400 naming `file`) and calls the model's
`process_transcription`; the answer is the text the model generates. The route is always
registered: on a model without "transcription" it answers 400 naming the capabilities the
model has.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from mstar import events
from mstar.api_server import openai_protocol as oai
from mstar.api_server.forms import read_body
from mstar.api_server.openai_routes import check_model, lacks
from mstar.api_server.request_flow import (
    ApiError,
    ClientGone,
    Run,
    Runner,
    StreamedResponse,
    collect,
    error_body,
    event_status,
    terminal,
)
from mstar.api_server.schemas import field_types

if TYPE_CHECKING:
    from mstar.api_server.backend import ModelInfo
    from mstar.config.settings import ServerSettings

RESPONSE_FORMATS = ("json", "text")
#: OpenAI's formats that carry timestamps (refused: a 400 naming `response_format`).
TIMED_FORMATS = ("srt", "vtt", "verbose_json")
#: vLLM's sampling extras passed to the model when given (`max_completion_tokens` as its
#: `max_tokens`).
_SAMPLING = ("seed", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
             "presence_penalty")


class TranscriptionRequest(BaseModel):
    """OpenAI's transcription form (its fields besides `file`), plus vLLM's sampling
    extras."""

    model_config = ConfigDict(extra="forbid")
    model: str
    # str, checked by parse_transcription (its 400 says why); the schema states the choices
    response_format: str = Field("json", json_schema_extra={
        "enum": [*RESPONSE_FORMATS, *TIMED_FORMATS]})
    language: str | None = Field(None, description="The audio's language (ISO-639-1).")
    prompt: str | None = Field(None, description="Text to guide the transcript's style or "
                                                 "continue a previous segment.")
    temperature: float = Field(0.0, ge=0, le=1)
    stream: bool = False
    timestamp_granularities: list[str] | None = None
    include: list[str] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)


def parse_transcription(fields: dict[str, Any]) -> TranscriptionRequest:
    """The form's fields as a request, or `oai.InvalidRequest` naming the first bad one."""
    req = oai.parse(TranscriptionRequest, fields)
    if req.response_format in TIMED_FORMATS:
        raise oai.InvalidRequest(f"response_format {req.response_format!r} needs timestamps, "
                                 "which this server does not give; use json or text",
                                 "response_format")
    if req.response_format not in RESPONSE_FORMATS:
        raise oai.InvalidRequest(f"response_format {req.response_format!r} is not supported; "
                                 f"supported: {', '.join(RESPONSE_FORMATS)}", "response_format")
    if req.timestamp_granularities:
        raise oai.InvalidRequest("timestamp_granularities: this server gives no timestamps",
                                 "timestamp_granularities")
    if req.include:
        raise oai.InvalidRequest("include: this server gives no logprobs for transcripts",
                                 "include")
    return req


def native_request(req: TranscriptionRequest, default_max_tokens: int) -> dict[str, Any]:
    """What the model's `process_transcription` gets: `language` and `prompt` (None when
    not given), `temperature`, `max_tokens` (the context length when not given, as chat's)
    and the sampling extras given."""
    out: dict[str, Any] = {"language": req.language, "prompt": req.prompt,
                           "temperature": req.temperature,
                           "max_tokens": req.max_completion_tokens or default_max_tokens}
    for name in _SAMPLING:
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    return out


def usage_json(usage: events.Usage) -> dict[str, Any]:
    """OpenAI's token usage of a transcription."""
    return {"type": "tokens", "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _frame(data: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


async def _sse(run: Run, first: events.Event) -> AsyncIterator[bytes]:
    """`transcript.text.delta` per piece of text, then `transcript.text.done`; an error is
    one `data: {"error": ...}` frame and the end."""
    event, text = first, []
    while True:
        if isinstance(event, events.TextDelta) and event.index == 0 and event.text:
            text.append(event.text)
            yield _frame({"type": "transcript.text.delta", "delta": event.text})
        elif isinstance(event, events.Finished):
            yield _frame({"type": "transcript.text.done", "text": "".join(text),
                          "usage": usage_json(event.usage)})
        elif isinstance(event, events.Error):
            yield _frame(error_body(event_status(event), event.message, param=event.param))
        if terminal(event):
            return
        event = await run.next()


def _form_body(served: str) -> dict[str, Any]:
    """The route's `openapi_extra`: OpenAI's form, its fields plain, the audio in `file`."""
    schema = TranscriptionRequest.model_json_schema()
    schema["properties"]["model"] = {"type": "string", "enum": [served]}
    schema["properties"]["file"] = {"type": "string", "format": "binary"}
    schema["required"] = ["file", "model"]
    return {"requestBody": {"required": True, "description": "OpenAI's transcription form "
                            "(the audio in `file`), plus vLLM's sampling fields.",
                            "content": {"multipart/form-data": {"schema": schema}}}}


def add_transcription_route(router: APIRouter, runner: Runner, info: ModelInfo,
                            settings: ServerSettings) -> None:
    """Add `POST /v1/audio/transcriptions` to `router` (whatever the model's capabilities:
    one without "transcription" is told so with a 400)."""
    served = info["name"]
    types = field_types(TranscriptionRequest)

    @router.post("/v1/audio/transcriptions", openapi_extra=_form_body(served))
    async def transcriptions(request: Request) -> Response:
        runner.recorder(request)
        if "transcription" not in info["capabilities"]:
            raise lacks(info, "transcription", "POST /v1/audio/transcriptions")
        body = await read_body(request, settings.max_body_bytes, types)
        req = parse_transcription(body.fields)
        check_model(req.model, served)
        names = [part.name for part in body.files]
        if names != ["file"]:
            others = [name for name in names if name != "file"]
            raise ApiError(400, "give the audio as one file part named `file`" + (
                f"; unexpected: {', '.join(others)}" if others else ""),
                param=others[0] if others else "file")
        try:
            run, first = await runner.start(request, native_request(req, info["max_model_len"]),
                                            kind="transcription", blobs=[body.files[0].data])
        except ApiError as exc:
            if exc.param == "max_tokens":
                exc.param = "max_completion_tokens"
            raise
        if req.stream:
            return StreamedResponse(_sse(run, first), on_close=run.close)
        try:
            collected = await collect(run, first, request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            run.close()
        text = "".join(e.text for e in collected
                       if isinstance(e, events.TextDelta) and e.index == 0)
        if req.response_format == "text":
            return Response(text, media_type="text/plain; charset=utf-8")
        done = collected[-1]
        assert isinstance(done, events.Finished)
        return Response(msgspec.json.encode({"text": text, "usage": usage_json(done.usage)}),
                        media_type="application/json")


__all__ = ["RESPONSE_FORMATS", "TIMED_FORMATS", "TranscriptionRequest",
           "add_transcription_route", "native_request", "parse_transcription"]
