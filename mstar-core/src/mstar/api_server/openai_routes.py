"""The OpenAI-compatible routes, enabled by the model's declared capabilities (never its
name): `chat` gives `POST /v1/chat/completions`, `completions` gives `POST /v1/completions`;
on a model without the capability the route answers 400 naming the capabilities it has.

Here, in the API server: parse and check the request (`openai_protocol`), refuse media the
model does not take (capabilities `image_input`, `audio_input`, `video_input`), fetch every
media item (`mstar.media.fetch_media`: data URIs, http(s) with the private-address guard
and the size and time limits; `upload://<name>`: a file sent with the request as
multipart/form-data, kept under `--upload-dir` until its bytes are read), and send the data
worker normalised messages whose media parts index the fetched bytes (`kind="chat"`). The data worker decodes the media, renders
the model's chat template, detokenises and applies stop strings; its events come back as
`mstar.events`, turned here into OpenAI's JSON or SSE chunks.

A chat asking for a spoken reply (`modalities: ["text", "audio"]`; capability
`audio_output`) gives the model `modalities` and `voice` (`native_fields`); its text is the
reply's transcript and its `AudioChunk`s the reply's audio (`_SpokenReply`): encoded whole
in the asked format (`message.audio`), or streamed as pcm16 pieces (`delta.audio`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import msgspec
import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from mstar import events
from mstar.api_server import openai_protocol as oai
from mstar.api_server.forms import read_body
from mstar.api_server.request_flow import (
    ApiError,
    ClientGone,
    Run,
    Runner,
    StreamedResponse,
    collect,
    error_body,
    event_status,
    read_json,
    terminal,
)
from mstar.api_server.schemas import field_types, request_body
from mstar.media.audio_out import AudioEncoder, chunk_samples, encode_audio, output_rate
from mstar.model.fields import UPLOAD_SCHEME

if TYPE_CHECKING:
    from mstar.api_server.backend import ModelInfo
    from mstar.config.settings import ServerSettings
    from mstar.media import MediaLimits, UploadStore

#: content part type -> (normalised kind, the capability it needs)
_MEDIA_PARTS = {"image_url": ("image", "image_input"), "input_audio": ("audio", "audio_input"),
                "video_url": ("video", "video_input")}


def _accepts(capabilities: set[str]) -> str:
    kinds = ["text"] + [kind for kind, cap in _MEDIA_PARTS.values() if cap in capabilities]
    return ", ".join(kinds)


async def _media_bytes(part: Any, where: str, limits: MediaLimits,
                       client: httpx.AsyncClient, uploaded: Callable[[str], bytes]) -> bytes:
    from mstar import media

    try:
        if part.type == "input_audio":
            return media.decode_base64(part.input_audio.data, limits)
        url = part.image_url.url if part.type == "image_url" else part.video_url.url
        if url.startswith(UPLOAD_SCHEME):
            return uploaded(url.removeprefix(UPLOAD_SCHEME))
        return await media.fetch_media(url, limits, client=client)
    except media.MediaError as exc:
        raise ApiError(exc.status, str(exc), param=exc.param or where) from None


async def resolve_messages(req: oai.ChatCompletionRequest, capabilities: set[str],
                           model: str, limits: MediaLimits, client: httpx.AsyncClient,
                           uploaded: Callable[[str], bytes],
                           ) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The normalised messages (media parts `{"type": kind, "blob": i, ...}`) and the
    media bytes they index, fetched concurrently (`uploaded(name)`: an uploaded file's)."""
    messages: list[dict[str, Any]] = []
    fetches = []
    for m, message in enumerate(req.messages):
        content: Any = message.content if message.content is not None else ""
        if isinstance(content, list):
            parts = []
            for p, part in enumerate(content):
                where = f"messages[{m}].content[{p}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                kind, capability = _MEDIA_PARTS[part.type]
                if capability not in capabilities:
                    raise ApiError(400, f"model {model!r} does not take {kind} input; it "
                                        f"accepts: {_accepts(capabilities)}", param=where)
                entry: dict[str, Any] = {"type": kind, "blob": len(fetches)}
                if part.type == "video_url" and part.video_url.fps is not None:
                    entry["fps"] = part.video_url.fps
                if part.type == "input_audio":
                    entry["format"] = part.input_audio.format
                parts.append(entry)
                fetches.append(_media_bytes(part, where, limits, client, uploaded))
            content = parts
        messages.append({"role": message.role, "content": content,
                         **({"name": message.name} if message.name else {})})
    blobs = list(await asyncio.gather(*fetches)) if fetches else []
    return messages, blobs


def _frame(data: Any) -> bytes:
    return b"data: " + msgspec.json.encode(data) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


async def _stream(run: Run, first: events.Event, n: int, include_usage: bool,
                  chunk: Callable[..., dict[str, Any]], usage_object: str,
                  ids: tuple[str, str, int]) -> AsyncIterator[bytes]:
    """OpenAI's SSE: a chunk per text event, a closing chunk per choice with its
    finish_reason, the usage chunk when asked, then [DONE]; an error mid-stream is one
    `data: {"error": ...}` frame and the end."""
    event = first
    while True:
        if isinstance(event, events.TextDelta | events.AudioChunk):
            for frame in chunk(event, None):
                yield _frame(frame)
        elif isinstance(event, events.Finished):
            reasons = oai.finish_reasons(event, n)
            for index in range(n):
                for frame in chunk(events.TextDelta("", [], index), reasons[index]):
                    yield _frame(frame)
            if include_usage:
                yield _frame(oai.usage_chunk(*ids, event.usage, usage_object))
            yield _DONE
            return
        elif isinstance(event, events.Error):
            yield _frame(error_body(event_status(event), event.message, param=event.param))
            return
        if terminal(event):
            return
        event = await run.next()


def lacks(info: ModelInfo, capability: str, route: str, *, param: str = "model") -> ApiError:
    """The 400 for a route (or what a request asks, `param`) the served model's
    capabilities do not include."""
    have = ", ".join(sorted(info["capabilities"])) or "none"
    return ApiError(400, f"model {info['name']!r} does not serve {route} (capability "
                         f"{capability!r}); its capabilities: {have}", param=param,
                    code="unsupported_capability")


def check_model(name: str, served: str) -> None:
    """A 404 for a model name this server does not serve."""
    if name != served:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                            f"{served!r}", param="model", code="model_not_found")


def _one_rate(rate: int, chunk: events.AudioChunk) -> None:
    if chunk.sample_rate != rate:
        raise ValueError(f"the model changed its sample rate mid-reply ({rate} to "
                         f"{chunk.sample_rate} Hz)")


class _SpokenReply:
    """The audio of a chat's spoken reply, per choice: encoded whole in the asked format
    (`message.audio`), or streamed as pcm16 pieces (`delta.audio`, the only format
    `check_chat` lets stream: its pieces need no flush at the end). A choice's first
    streamed piece carries `expires_at`; every audio piece its rate."""

    def __init__(self, rid: str, fmt: str, created: int):
        self.rid, self.created = rid, created
        self.format = oai.CHAT_AUDIO_FORMATS[fmt]
        self._encoders: dict[int, AudioEncoder] = {}
        self._started: set[int] = set()

    def whole(self, index: int, transcript: str,
              chunks: list[events.AudioChunk]) -> dict[str, Any]:
        """`message.audio` of choice `index`: its chunks as one file (a reply the model
        ended before any audio has empty `data`)."""
        if not chunks:
            return oai.chat_audio(self.rid, index, data=b"", transcript=transcript,
                                  expires_at=self.created)
        rate = chunks[0].sample_rate
        for chunk in chunks:
            _one_rate(rate, chunk)
        samples = np.concatenate([chunk_samples(chunk) for chunk in chunks])
        return oai.chat_audio(self.rid, index, data=encode_audio(samples, rate, self.format),
                              transcript=transcript, expires_at=self.created,
                              sample_rate=output_rate(self.format, rate))

    def delta(self, event: events.TextDelta | events.AudioChunk) -> dict[str, Any]:
        """`delta.audio` of a streamed event: a transcript piece, or a piece of audio."""
        extra: dict[str, Any] = {}
        if event.index not in self._started:
            self._started.add(event.index)
            extra["expires_at"] = self.created
        if isinstance(event, events.TextDelta):
            return oai.chat_audio(self.rid, event.index, transcript=event.text, **extra)
        encoder = self._encoders.get(event.index)
        if encoder is None:
            encoder = self._encoders[event.index] = AudioEncoder(self.format,
                                                                 event.sample_rate)
        _one_rate(encoder.input_rate, event)
        return oai.chat_audio(self.rid, event.index, data=encoder.encode(chunk_samples(event)),
                              sample_rate=encoder.sample_rate, **extra)

    def close(self) -> None:
        for encoder in self._encoders.values():
            encoder.close()


def add_openai_routes(router: APIRouter, runner: Runner, info: ModelInfo,
                      settings: ServerSettings) -> None:
    """Add the chat and completion routes to `router` (each refusing with a 400 when the
    model's capabilities lack it)."""
    capabilities = set(info["capabilities"])
    served = info["name"]
    limits = settings.media_limits()
    max_len = info["max_model_len"]

    uploads: list[UploadStore] = []  # made on the first upload: most servers never see one

    def upload_store() -> UploadStore:
        from mstar.media import UploadStore

        if not uploads:  # one directory per API server process: each purges its own
            uploads.append(UploadStore(Path(settings.upload_dir) / f"api-{os.getpid()}",
                                       limits))
            uploads[0].purge()
        return uploads[0]

    chat_types = field_types(oai.ChatCompletionRequest)

    async def read_chat(request: Request) -> dict[str, Any]:
        """The JSON body, or a multipart/form-data one (`forms.read_body`), its files saved
        under the request's upload directory (read back as `upload://<file name>`)."""
        body = await read_body(request, settings.max_body_bytes, chat_types)
        from mstar.media import MediaError

        for part in body.files:
            try:
                upload_store().save(request.state.request_id, part.filename, part.data)
            except MediaError as exc:
                raise ApiError(exc.status, str(exc), param="files") from None
        return body.fields

    async def run_openai(request: Request, req: oai._Sampling, body: dict[str, Any],
                         kind: str, blobs: list[bytes], created: int,
                         respond: Callable[[oai.Choices, events.Finished], dict[str, Any]],
                         chunk: Callable[..., list[dict[str, Any]]], usage_object: str, *,
                         on_close: Callable[[], None] = lambda: None,
                         renamed: dict[str, str] | None = None) -> Response:
        """Run the request; `respond` builds the whole answer (in a thread: it may encode
        audio), `chunk` the streamed frames of an event; `on_close` runs when the answer
        ends; `renamed`: the model's name of a field -> the client's, in errors."""
        rid = request.state.request_id
        try:
            run, first = await runner.start(request, body, kind=kind, blobs=blobs)
        except ApiError as exc:
            exc.param = (renamed or {}).get(exc.param or "", exc.param)
            on_close()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def close() -> None:
                run.close()
                on_close()

            return StreamedResponse(_stream(run, first, req.n, include_usage, chunk, usage_object,
                                            (rid, req.model, created)), on_close=close)
        try:
            collected = await collect(run, first, request)
        except ClientGone:
            return Response(status_code=499)
        finally:
            run.close()
            on_close()
        choices = oai.Choices(req.n)
        for event in collected:
            if isinstance(event, events.TextDelta | events.AudioChunk) and event.index < req.n:
                choices.add(event)
        done = collected[-1]
        assert isinstance(done, events.Finished)
        answer = await anyio.to_thread.run_sync(respond, choices, done)
        return Response(msgspec.json.encode(answer), media_type="application/json")

    def parsed(model: type[oai.T], body: dict[str, Any]) -> oai.T:
        req = oai.parse(model, body)
        oai.check_common(req)
        if isinstance(req, oai.ChatCompletionRequest):
            oai.check_chat(req)
        elif isinstance(req, oai.CompletionRequest):
            oai.check_completion(req)
        check_model(req.model, served)
        return req

    @router.post("/v1/chat/completions", openapi_extra=request_body(
        oai.ChatCompletionRequest, "OpenAI's chat completion request (JSON, or "
        "multipart/form-data: the JSON in the field `request`, files as upload://<name>).",
        served=served))
    async def chat_completions(request: Request) -> Response:
        runner.recorder(request)
        if "chat" not in capabilities:
            raise lacks(info, "chat", "POST /v1/chat/completions")
        rid, created = request.state.request_id, int(time.time())
        try:
            req = parsed(oai.ChatCompletionRequest, await read_chat(request))
            if oai.wants_audio(req) and "audio_output" not in capabilities:
                raise lacks(info, "audio_output", "spoken replies", param="modalities")
            runner.admit()  # before fetching media for a request that cannot run
            async with httpx.AsyncClient(follow_redirects=False) as client:
                messages, blobs = await resolve_messages(
                    req, capabilities, served, limits, client,
                    lambda name: upload_store().read(rid, name))
        finally:
            if uploads:  # the bytes are read: the files can go
                uploads[0].release(rid)
        body = {"messages": messages, **oai.native_fields(req, default_max_tokens=max_len)}
        if req.chat_template_kwargs:
            body["chat_template_kwargs"] = req.chat_template_kwargs
        model = req.model
        spoken = _SpokenReply(rid, req.audio.format, created) \
            if oai.wants_audio(req) and req.audio is not None else None

        def respond(choices: oai.Choices, done: events.Finished) -> dict[str, Any]:
            audio = None if spoken is None else [
                spoken.whole(i, choices.text[i], choices.audio[i]) for i in range(req.n)]
            return oai.chat_response(rid, model, created, choices, done, req.logprobs, audio)

        started: set[int] = set()

        def chunk(event: events.TextDelta | events.AudioChunk,
                  finish: str | None) -> list[dict[str, Any]]:
            if spoken is None and isinstance(event, events.AudioChunk):
                return []  # audio nobody asked for
            frames = []
            if event.index not in started:
                started.add(event.index)
                frames.append(oai.chat_chunk(rid, model, created, event.index, {
                    "role": "assistant", "content": "" if spoken is None else None}))
            if finish is not None:
                frames.append(oai.chat_chunk(rid, model, created, event.index, {},
                                             finish_reason=finish))
            elif isinstance(event, events.AudioChunk):
                assert spoken is not None
                frames.append(oai.chat_chunk(rid, model, created, event.index,
                                             {"audio": spoken.delta(event)}))
            elif event.text or event.logprobs:
                delta = {"content": event.text} if spoken is None \
                    else {"audio": spoken.delta(event)}
                frames.append(oai.chat_chunk(
                    rid, model, created, event.index, delta,
                    logprobs=event.logprobs or [] if req.logprobs else None))
            return frames

        return await run_openai(request, req, body, "chat", blobs, created, respond, chunk,
                                "chat.completion.chunk",
                                on_close=spoken.close if spoken is not None else lambda: None,
                                renamed={"voice": "audio.voice"})

    @router.post("/v1/completions", openapi_extra=request_body(
        oai.CompletionRequest, "OpenAI's (legacy) completion request.", served=served))
    async def completions(request: Request) -> Response:
        runner.recorder(request)
        if "completions" not in capabilities:
            raise lacks(info, "completions", "POST /v1/completions")
        created = int(time.time())
        req = parsed(oai.CompletionRequest, await read_json(request, settings.max_body_bytes))
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        body = {"prompt": prompt, **oai.native_fields(req, default_max_tokens=16)}
        rid, model = request.state.request_id, req.model
        want_logprobs = req.logprobs is not None
        offsets = [0] * req.n

        def respond(choices: oai.Choices, done: events.Finished) -> dict[str, Any]:
            return oai.completion_response(rid, model, created, choices, done,
                                           want_logprobs)

        def chunk(event: events.TextDelta | events.AudioChunk,
                  finish: str | None) -> list[dict[str, Any]]:
            if isinstance(event, events.AudioChunk) or (
                    finish is None and not event.text and not event.logprobs):
                return []
            logprobs = None
            if want_logprobs and finish is None:
                logprobs = oai.completion_logprobs(event.logprobs or [],
                                                   offsets[event.index])
            offsets[event.index] += len(event.text)
            return [oai.completion_chunk(rid, model, created, event.index, event.text,
                                         finish_reason=finish, logprobs=logprobs)]

        return await run_openai(request, req, body, "completion", [], created, respond,
                                chunk, "text_completion")


__all__ = ["add_openai_routes", "check_model", "lacks", "resolve_messages"]
