"""The wire protocol both clients speak, as pure functions and tables: how a call's body is
built, how each route's answer (JSON or SSE frames) is parsed, which failures are retried
and after how long, and which exception a failure becomes.

The sync and async clients only move bytes; everything they decide comes from here, so the
two never drift apart. A new endpoint is one `Route` (path and parsers) plus a method of a
few lines on each client.
"""

from __future__ import annotations

import base64
import email.utils
import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from mstar import __version__, events
from mstar.client import _tensors as tensors
from mstar.client._media import image_file, image_url, media_bytes
from mstar.client._payload import SAFETENSORS, Payload
from mstar.client._sse import SSEDecoder, SSEFrame
from mstar.client.errors import (
    APIConnectionError,
    APITimeoutError,
    MStarError,
    UnsupportedCapabilityError,
    error_class,
)
from mstar.client.results import (
    Audio,
    ChatChoice,
    ChatDelta,
    ChatResponse,
    GenerateResponse,
    ModelInfo,
    Speech,
)

T = TypeVar("T")
E = TypeVar("E")

#: Statuses that mean "not now": the server is at its limit or still starting.
RETRY_STATUSES = frozenset({429, 503})
#: Transport failures before any answer: a refused or timed-out connect, or a connection
#: the server closed before answering (typically a stale keep-alive one): retried.
RETRY_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)
#: No wait between retries is longer, whatever `Retry-After` or the backoff say.
MAX_RETRY_DELAY_S = 30.0
DONE = "[DONE]"


# ------------------------------------------------------------------------------------------
# Routes


@dataclass(frozen=True)
class Route(Generic[T, E]):
    """One endpoint: `parse` turns a complete response into the call's result;
    `parse_frame` (routes that stream) turns one SSE frame into the items it yields.
    Statuses in `expect` are answers, not errors; `retry` is off for probes (health) that
    must report the server's state as it is."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    parse_frame: Callable[[SSEFrame, str | None], Sequence[E]] | None = None
    expect: tuple[int, ...] = (200,)
    retry: bool = True


def http_args(body: Any) -> dict[str, Any]:
    """`httpx` request arguments for a body: a `Payload` as it says, anything else JSON."""
    return body.http_args() if isinstance(body, Payload) else {"json": body}


def require_capability(listed: Sequence[ModelInfo], model: str | None, capability: str,
                       method: str) -> None:
    """Raise `UnsupportedCapabilityError` when the served model (`model`, else the first
    listed) does not declare `capability`, which `method` needs."""
    info = next((m for m in listed if m.id == model), listed[0] if listed else None)
    if info is None or capability not in info.capabilities:
        name, have = (info.id, ", ".join(info.capabilities)) if info else (model, "")
        raise UnsupportedCapabilityError(
            f"{method}() needs a model with the {capability!r} capability; model {name!r} "
            f"has: {have or 'none'}", code="unsupported_capability")


def request_id(response: httpx.Response) -> str | None:
    return response.headers.get("x-request-id")


def parse_response(route: Route[T, Any], response: httpx.Response) -> T:
    """`route.parse(response)`; an answer of an unexpected shape is an `MStarError`."""
    try:
        return route.parse(response)
    except (ValueError, KeyError, TypeError, IndexError, msgspec.MsgspecError) as exc:
        raise MStarError(f"unexpected answer to {route.method} {route.path}: {exc}",
                         status=response.status_code, request_id=request_id(response)) from exc


# ------------------------------------------------------------------------------------------
# Errors


def error_from_body(status: int, body: Any, rid: str | None, fallback: str) -> MStarError:
    """The exception for an error answer whose JSON is `body` (OpenAI's `{"error": {...}}`
    when the server sent one; `fallback` is the message otherwise)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, Mapping):
        error = {}
    return error_class(status)(str(error.get("message") or fallback), status=status,
                               type=error.get("type"), param=error.get("param"),
                               code=error.get("code"), request_id=rid)


def error_from_response(response: httpx.Response) -> MStarError:
    """The exception for a response whose status is not an answer (read it first)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    fallback = response.text.strip()[:500] or response.reason_phrase or "error"
    return error_from_body(response.status_code, body, request_id(response), fallback)


def transport_error(exc: httpx.TransportError, url: str) -> APIConnectionError:
    """A transport failure as the SDK's exception (a timeout is `APITimeoutError`)."""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"timed out talking to {url} ({type(exc).__name__})")
    return APIConnectionError(f"cannot reach {url}: {type(exc).__name__}: {exc}")


_STATUS_OF_TYPE = {"invalid_request_error": 400, "authentication_error": 401,
                   "not_found_error": 404, "rate_limit_error": 429}


def _stream_status(code: Any, type: Any) -> int:
    """The HTTP status an error inside a stream stands for: its `code` when that is a
    status (mstar's native events), else what its OpenAI `type` means (500 if unknown)."""
    if isinstance(code, int) and 400 <= code < 600:
        return code
    return _STATUS_OF_TYPE.get(type, 500)


# ------------------------------------------------------------------------------------------
# Retries


@dataclass(frozen=True)
class RetryPolicy:
    """At most `max_retries` retries, waiting `backoff * 2**attempt` seconds (or what the
    server's `Retry-After` asks), only for failures before any answer (`RETRY_TRANSPORT`)
    and for 429 and 503, which the server sends before doing any work. A streamed answer
    is never retried once it has begun."""

    max_retries: int = 2
    backoff: float = 0.5

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff < 0:
            raise ValueError("max_retries and backoff must be >= 0")

    def delay(self, attempt: int, retry_after: str | None = None) -> float | None:
        """Seconds to wait before retry number `attempt + 1`; None when none is left."""
        if attempt >= self.max_retries:
            return None
        asked = parse_retry_after(retry_after)
        wait = asked if asked is not None else self.backoff * 2 ** attempt
        return min(wait, MAX_RETRY_DELAY_S)

    def after_transport_error(self, route: Route, attempt: int, exc: httpx.TransportError,
                              url: str) -> float:
        """The wait before retrying after `exc`; raises the SDK's error when not retried."""
        delay = self.delay(attempt) if route.retry and isinstance(exc, RETRY_TRANSPORT) \
            else None
        if delay is None:
            raise transport_error(exc, url) from exc
        return delay

    def after_status(self, route: Route, attempt: int, response: httpx.Response) -> float:
        """The wait before retrying after an error status (the body already read); raises
        the matching `MStarError` when not retried."""
        delay = None
        if route.retry and response.status_code in RETRY_STATUSES:
            delay = self.delay(attempt, response.headers.get("retry-after"))
        if delay is None:
            raise error_from_response(response)
        return delay


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds from now (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_reason(exc: httpx.TransportError | None, response: httpx.Response | None) -> str:
    """Why a request is retried, for the log."""
    if response is not None:
        return f"{response.status_code} {response.reason_phrase}"
    return f"connection failed ({type(exc).__name__})"


# ------------------------------------------------------------------------------------------
# Headers


def headers(api_key: str | None) -> dict[str, str]:
    """Headers every request carries: the bearer key (argument, else `MSTAR_API_KEY`)."""
    out = {"User-Agent": f"mstar-python/{__version__}"}
    key = api_key if api_key is not None else os.environ.get("MSTAR_API_KEY")
    if key:
        out["Authorization"] = f"Bearer {key}"
    return out


# ------------------------------------------------------------------------------------------
# Streams


class FrameReader(Generic[E]):
    """Turns the lines of an SSE answer into the route's items; `done` once `[DONE]` came.
    An error frame raises (with the response's request id)."""

    def __init__(self, parse_frame: Callable[[SSEFrame, str | None], Sequence[E]],
                 rid: str | None):
        self._parse, self._rid = parse_frame, rid
        self._decoder = SSEDecoder()
        self.done = False

    def feed(self, line: str) -> Sequence[E]:
        frame = self._decoder.feed(line)
        if frame is None:
            return ()
        if frame.data == DONE:
            self.done = True
            return ()
        try:
            return self._parse(frame, self._rid)
        except (ValueError, KeyError, TypeError, msgspec.MsgspecError) as exc:
            raise MStarError(f"unreadable stream frame: {exc}", request_id=self._rid) from exc

    def finish(self) -> None:
        """Called when the answer ended: a stream cut before `[DONE]` is an error."""
        if not self.done:
            raise APIConnectionError("the stream ended before it was complete",
                                     request_id=self._rid)


def stream_reader(route: Route[Any, E], response: httpx.Response) -> FrameReader[E]:
    """The reader of a streamed answer; an answer that is no event stream (a route that
    does not stream) is an `MStarError` (the caller closes the response)."""
    kind = response.headers.get("content-type", "")
    if route.parse_frame is None or not kind.startswith("text/event-stream"):
        raise MStarError(f"{route.method} {route.path} did not answer with an event stream "
                         f"(content-type {kind!r})", status=response.status_code,
                         request_id=request_id(response))
    return FrameReader(route.parse_frame, request_id(response))


# ------------------------------------------------------------------------------------------
# Chat (OpenAI's /v1/chat/completions)


def chat_messages(text_or_messages: str | Sequence[Mapping[str, Any]], *,
                  images: object = None, system: str | None = None) -> list[dict[str, Any]]:
    """The `messages` of a chat call: a str is one user message; `images` (one or a list)
    become `image_url` parts placed before the text of the last user message; `system`
    is prepended as a system message."""
    if isinstance(text_or_messages, str):
        messages = [{"role": "user", "content": text_or_messages}]
    else:
        messages = [dict(m) for m in text_or_messages]
    if images is not None:
        items = list(images) if isinstance(images, list | tuple) else [images]
        users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
        if not users:
            raise ValueError("images need a user message to attach to")
        last = messages[users[-1]]
        content = last.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) \
            else list(content or [])
        last["content"] = [{"type": "image_url", "image_url": {"url": image_url(item)}}
                           for item in items] + parts
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


#: A chat's audio format (OpenAI's name) -> the `Speech.format` its bytes are.
_CHAT_AUDIO = {"pcm16": "pcm"}


def chat_audio_format(audio_out: bool, voice: str | None, audio_format: str | None,
                      stream: bool) -> str | None:
    """The audio format a chat call asks for (None: text only): `audio_format`, else pcm16
    streamed (the only format a spoken reply streams in) and wav whole."""
    if not audio_out:
        if voice is not None or audio_format is not None:
            raise ValueError("voice and audio_format need audio_out=True")
        return None
    return audio_format or ("pcm16" if stream else "wav")


def chat_body(messages: list[dict[str, Any]], *, model: str, stream: bool,
              max_tokens: int | None, temperature: float | None,
              extra: Mapping[str, Any], audio_format: str | None = None,
              voice: str | None = None) -> dict[str, Any]:
    """The JSON of a chat call; options left None are not sent (the server's defaults).
    `audio_format`: a spoken reply in it (`voice` None: the model's default voice)."""
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": stream}
    for name, value in (("max_tokens", max_tokens), ("temperature", temperature)):
        if value is not None:
            body[name] = value
    if audio_format is not None:
        body["modalities"] = ["text", "audio"]
        body["audio"] = {"format": audio_format, **({"voice": voice} if voice else {})}
    body.update(extra)
    return body


def _usage(data: Mapping[str, Any] | None) -> events.Usage | None:
    if not data:
        return None
    return events.Usage(prompt_tokens=int(data.get("prompt_tokens") or 0),
                        completion_tokens=int(data.get("completion_tokens") or 0))


def _chat_audio(audio: Mapping[str, Any] | None, fmt: str,
                rid: str | None) -> Speech | None:
    """A `message.audio` or `delta.audio` with data, as `Speech` (its bytes in `fmt`,
    OpenAI's name)."""
    if not audio or "data" not in audio:
        return None
    rate = audio.get("sample_rate")
    return Speech(audio=base64.b64decode(audio["data"]), format=_CHAT_AUDIO.get(fmt, fmt),
                  sample_rate=int(rate) if rate is not None else None, request_id=rid)


def parse_chat(response: httpx.Response, audio_format: str | None = None) -> ChatResponse:
    """The chat completion; `audio_format`: the format its spoken replies were asked in."""
    body, rid = response.json(), request_id(response)
    choices = []
    for c in body["choices"]:
        message = c.get("message") or {}
        audio = message.get("audio") or {}
        choices.append(ChatChoice(index=c.get("index", len(choices)),
                                  text=message.get("content") or audio.get("transcript") or "",
                                  finish_reason=c.get("finish_reason"), message=message,
                                  logprobs=c.get("logprobs"),
                                  audio=_chat_audio(audio, audio_format or "", rid)))
    return ChatResponse(choices=choices, usage=_usage(body.get("usage")), raw=body,
                        request_id=rid)


def parse_chat_frame(frame: SSEFrame, rid: str | None) -> list[ChatDelta]:
    """One `chat.completion.chunk`: a delta per choice; a chunk with usage and no choices
    (the last, with `include_usage`) is one empty delta carrying it."""
    data = json.loads(frame.data)
    if frame.event == "error" or "error" in data:
        error = data.get("error") if isinstance(data.get("error"), Mapping) else data
        status = _stream_status(error.get("code"), error.get("type"))
        raise error_from_body(status, {"error": error}, rid, "error in the stream")
    usage = _usage(data.get("usage"))
    deltas = []
    for c in data.get("choices") or ():
        delta = c.get("delta") or {}
        audio = delta.get("audio") or {}
        deltas.append(ChatDelta(text=delta.get("content") or audio.get("transcript") or "",
                                index=c.get("index", 0), finish_reason=c.get("finish_reason"),
                                usage=usage, raw=data,
                                audio=_chat_audio(audio, "pcm16", rid)))
    if not deltas and usage is not None:
        deltas.append(ChatDelta(text="", usage=usage, raw=data))
    return deltas


def chat_route(audio_format: str | None) -> Route[ChatResponse, ChatDelta]:
    """`CHAT`, reading spoken replies as `audio_format` (OpenAI's name; the answer does not
    say it)."""
    if audio_format is None:
        return CHAT
    return Route("POST", CHAT.path, lambda r: parse_chat(r, audio_format), parse_chat_frame)


# ------------------------------------------------------------------------------------------
# Native /generate, models, health


class _GenerateBody(msgspec.Struct):
    id: str
    events: list[events.Event]
    finish_reason: str
    usage: events.Usage
    text: list[str] = []
    outputs: dict[str, dict[str, Any]] = {}
    timing: dict[str, float] = {}


_EVENT = msgspec.json.Decoder(events.Event)


def _output(value: Mapping[str, Any]) -> Any:
    """One output of the JSON answer: an image, audio or a tensor (by its fields)."""
    if "mime_type" in value:
        return _image(base64.b64decode(value["data"]))
    array = tensors.from_json(value)
    return Audio(array, int(value["sample_rate"])) if "sample_rate" in value else array


def _image(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def parse_generate(response: httpx.Response) -> GenerateResponse:
    """The JSON answer, or the safetensors one (by its content type)."""
    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if kind == SAFETENSORS:
        return _parse_binary(response)
    typed = msgspec.json.decode(response.content, type=_GenerateBody)
    return GenerateResponse(id=typed.id, events=typed.events, text=typed.text,
                            finish_reason=typed.finish_reason, usage=typed.usage,
                            raw=response.json(), request_id=request_id(response),
                            outputs={k: _output(v) for k, v in typed.outputs.items()},
                            timing=typed.timing)


def _parse_binary(response: httpx.Response) -> GenerateResponse:
    """A safetensors answer: the outputs are its tensors, rebuilt by the kinds its
    metadata states (an image from its pixels, audio with its rate)."""
    from PIL import Image

    arrays, metadata = tensors.read_safetensors(response.content)
    kinds = json.loads(metadata.get("outputs", "{}"))
    outputs: dict[str, Any] = {}
    for name, array in arrays.items():
        kind = kinds.get(name, {})
        if kind.get("kind") == "image":
            outputs[name] = Image.fromarray(array)
        elif kind.get("kind") == "audio":
            outputs[name] = Audio(array, int(kind["sample_rate"]))
        else:
            outputs[name] = array
    usage = json.loads(metadata.get("usage", "{}"))
    return GenerateResponse(id=metadata["id"], events=[],
                            text=json.loads(metadata.get("text", "[]")),
                            finish_reason=metadata["finish_reason"],
                            usage=events.Usage(**usage), raw=metadata,
                            request_id=request_id(response), outputs=outputs,
                            timing=json.loads(metadata.get("timing", "{}")))


def actions(answer: GenerateResponse) -> Any:
    """The action chunk of an `act` answer (its "actions" output, a numpy array)."""
    if "actions" not in answer.outputs:
        raise MStarError("the answer has no 'actions' output (it has: "
                         f"{', '.join(answer.outputs) or 'none'})", request_id=answer.request_id)
    return answer.outputs["actions"]


def parse_generate_frame(frame: SSEFrame, rid: str | None) -> list[events.Event]:
    """One native SSE frame: an `mstar.events` object; an `error` event raises."""
    event = _EVENT.decode(frame.data)
    if isinstance(event, events.Error):
        status = _stream_status(event.code, event.type)
        raise error_class(status)(event.message, status=status, type=event.type,
                                  param=event.param, code=event.code, request_id=rid)
    return [event]


# ------------------------------------------------------------------------------------------
# Speech (OpenAI's /v1/audio/speech)

#: The Content-Type of each speech format, as the server sends it.
SPEECH_MEDIA_TYPES = {"audio/mpeg": "mp3", "audio/ogg": "opus", "audio/aac": "aac",
                      "audio/flac": "flac", "audio/wav": "wav", "audio/pcm": "pcm"}


def speech_body(text: str, *, model: str, voice: str | None, format: str,
                extra: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of a speech call: the audio streamed as encoded (`stream_format` "audio",
    which a whole answer is read from too); `voice` None leaves the model's default."""
    body: dict[str, Any] = {"model": model, "input": text, "response_format": format,
                            "stream_format": "audio"}
    if voice is not None:
        body["voice"] = voice
    body.update(extra)
    return body


def parse_speech(response: httpx.Response) -> Speech:
    from mstar.client._audio import container_rate

    kind = response.headers.get("content-type", "").split(";")[0].strip()
    if kind not in SPEECH_MEDIA_TYPES:
        raise ValueError(f"content-type {kind!r} is not a speech format")
    fmt, audio = SPEECH_MEDIA_TYPES[kind], response.content
    rate = container_rate(audio, fmt)
    if rate is None and response.headers.get("x-sample-rate", "").isdigit():
        rate = int(response.headers["x-sample-rate"])
    return Speech(audio=audio, format=fmt, sample_rate=rate,
                  request_id=request_id(response))


def image_body(prompt: str, *, model: str, size: str | None, n: int,
               fields: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON of an image generation (`fields`: the model's own, e.g. `seed`); the
    images come back inline (`b64_json`)."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "n": n,
                            "response_format": "b64_json"}
    if size is not None:
        body["size"] = size
    body.update(fields)
    return body


def image_edit_payload(image: object, prompt: str, *, model: str, size: str | None, n: int,
                       fields: Mapping[str, Any]) -> Payload:
    """The multipart form of an image edit, as OpenAI's `images.edit` sends it."""
    data, mime = image_file(image)
    suffix = mime.rsplit("/", 1)[-1] if mime.startswith("image/") else "bin"
    body = image_body(prompt, model=model, size=size, n=n, fields=fields)
    return Payload(body, [("image", (f"image.{suffix}", data, mime))], form=True)


def parse_images(response: httpx.Response) -> list[bytes]:
    """The PNG bytes of each image, in order."""
    return [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]


def parse_models(response: httpx.Response) -> list[ModelInfo]:
    return [ModelInfo(id=m["id"], capabilities=list(m.get("capabilities") or []),
                      max_model_len=m.get("max_model_len"), raw=m)
            for m in response.json()["data"]]


def parse_json(response: httpx.Response) -> dict[str, Any]:
    return response.json()


# ------------------------------------------------------------------------------------------
# Transcriptions (OpenAI's /v1/audio/transcriptions)


def transcription_payload(audio: object, *, model: str, language: str | None,
                          prompt: str | None, extra: Mapping[str, Any]) -> Payload:
    """OpenAI's transcription form: the file (a path, str or `os.PathLike`, or bytes) in
    `file`; `extra` fields as given (`temperature`, `max_completion_tokens`, `seed`)."""
    if isinstance(audio, str):
        audio = Path(audio)
    if not isinstance(audio, os.PathLike | bytes | bytearray | memoryview):
        raise TypeError(f"transcribe() takes a path or bytes, not {type(audio).__name__}")
    item = media_bytes(audio)
    assert item is not None  # a path or bytes always reads
    data, mime = item
    name = Path(audio).name if isinstance(audio, os.PathLike) else "audio"
    body: dict[str, Any] = {"model": model, "response_format": "json"}
    for key, value in (("language", language), ("prompt", prompt)):
        if value is not None:
            body[key] = value
    body.update(extra)
    return Payload(body, [("file", (name, data, mime))], form=True)


def parse_transcription(response: httpx.Response) -> str:
    return response.json()["text"]


CHAT: Route[ChatResponse, ChatDelta] = Route("POST", "/v1/chat/completions", parse_chat,
                                             parse_chat_frame)
GENERATE: Route[GenerateResponse, events.Event] = Route("POST", "/generate", parse_generate,
                                                        parse_generate_frame)
#: Streamed (`tts(stream=True)`), the answer's bytes are yielded as they come.
SPEECH: Route[Speech, Any] = Route("POST", "/v1/audio/speech", parse_speech)
TRANSCRIPTIONS: Route[str, Any] = Route("POST", "/v1/audio/transcriptions",
                                        parse_transcription)
IMAGES: Route[list[bytes], Any] = Route("POST", "/v1/images/generations", parse_images)
IMAGE_EDITS: Route[list[bytes], Any] = Route("POST", "/v1/images/edits", parse_images)
MODELS: Route[list[ModelInfo], Any] = Route("GET", "/v1/models", parse_models)
#: 503 is an answer here ("starting", "unhealthy"), and a probe is never retried.
HEALTH: Route[dict[str, Any], Any] = Route("GET", "/health", parse_json, expect=(200, 503),
                                           retry=False)
