"""`MStarClient`: the blocking client, on `httpx.Client`.

Each public method builds its body with `_protocol` and hands a `Route` to `_request`
(one answer) or `_stream` (SSE); `_send` is the one place that talks to the network and
retries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import httpx

from mstar import events
from mstar.client import _protocol as protocol
from mstar.client import _world_model as world
from mstar.client._base import ClientBase
from mstar.client._payload import generate_payload
from mstar.client.errors import MStarError
from mstar.client.results import ChatDelta, ChatResponse, GenerateResponse, ModelInfo, Speech

if TYPE_CHECKING:
    import numpy as np

T = TypeVar("T")
E = TypeVar("E")


class Stream(Generic[E]):
    """A streamed answer, already accepted by the server (its status checked): iterate it
    once for the items. Leaving the loop early and `close()` (or `with`) end the request
    on the server. `request_id` is the server's id for it."""

    def __init__(self, response: httpx.Response, reader: protocol.FrameReader[E], url: str):
        self.response = response
        self.request_id = protocol.request_id(response)
        self._reader, self._url = reader, url
        self._items = self._iterate()

    def _iterate(self) -> Iterator[E]:
        try:
            for line in self.response.iter_lines():
                yield from self._reader.feed(line)
                if self._reader.done:
                    return
        except httpx.TransportError as exc:
            raise protocol.transport_error(exc, self._url) from exc
        finally:
            self.response.close()
        self._reader.finish()

    def __iter__(self) -> Iterator[E]:
        return self._items

    def __next__(self) -> E:
        return next(self._items)

    def close(self) -> None:
        self._items.close()
        self.response.close()

    def __enter__(self) -> Stream[E]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ByteStream:
    """A binary answer as it arrives (speech: the audio file in pieces, which concatenate
    to the whole file): iterate it once for `bytes`. Leaving early and `close()` (or
    `with`) end the request on the server."""

    def __init__(self, response: httpx.Response, url: str):
        self.response = response
        self.request_id = protocol.request_id(response)
        self._url = url
        self._items = self._iterate()

    def _iterate(self) -> Iterator[bytes]:
        try:
            yield from self.response.iter_bytes()
        except httpx.TransportError as exc:  # the server cut it: the answer is not whole
            raise protocol.transport_error(exc, self._url) from exc
        finally:
            self.response.close()

    def __iter__(self) -> Iterator[bytes]:
        return self._items

    def __next__(self) -> bytes:
        return next(self._items)

    def close(self) -> None:
        self._items.close()
        self.response.close()

    def __enter__(self) -> ByteStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MStarClient(ClientBase):
    """A blocking client for an mstar server.

    `MStarClient("http://localhost:8000").chat("Hi").text`; with `stream=True` the call
    returns a `Stream` to iterate. Use it as a context manager or `close()` it."""

    _HTTP: ClassVar[type[httpx.Client]] = httpx.Client
    _http: httpx.Client

    # -- routes ------------------------------------------------------------------------------
    def chat(self, text_or_messages: str | Sequence[Mapping[str, Any]], *,
             images: object = None, model: str | None = None, stream: bool = False,
             system: str | None = None, max_tokens: int | None = None,
             temperature: float | None = None, audio_out: bool = False,
             voice: str | None = None, audio_format: str | None = None, **extra: Any,
             ) -> ChatResponse | Stream[ChatDelta]:
        """OpenAI chat completion. A str is one user message (or pass OpenAI `messages`);
        `images` (a path, URL, bytes or PIL image, or a list) join the last user message;
        `extra` fields go into the body as given (e.g. `seed`, `stream_options`).
        `audio_out=True` (models with the "audio_output" capability) asks for a spoken
        reply in `voice` (None: the model's default) and `audio_format` (wav, mp3, flac,
        opus, aac or pcm16; default wav, pcm16 streamed, the only format it streams in):
        each choice's `.audio` is a `Speech` and `.text` its transcript; streamed, the
        deltas bring the transcript's text and pieces of audio (`delta.audio`)."""
        fmt = protocol.chat_audio_format(audio_out, voice, audio_format, stream)
        if fmt is not None:
            self._require("audio_output", "chat")
        messages = protocol.chat_messages(text_or_messages, images=images, system=system)
        body = protocol.chat_body(messages, model=model or self._default_model(),
                                  stream=stream, max_tokens=max_tokens,
                                  temperature=temperature, extra=extra, audio_format=fmt,
                                  voice=voice)
        route = protocol.chat_route(fmt)
        return self._stream(route, body) if stream else self._request(route, body)

    def generate(self, request: Mapping[str, Any] | None = None, *, stream: bool = False,
                 binary: bool = False, **fields: Any) -> GenerateResponse | Stream[events.Event]:
        """Native `POST /generate` with the model's own request fields (a dict, keywords,
        or both). Field values may be numpy arrays or torch tensors, PIL images, files
        (`pathlib.Path`) and bytes: sent as tensors and media (large ones as file parts).
        The answer's `.outputs[name]` are numpy arrays, PIL images and `Audio`; `binary=True`
        asks for them as one safetensors body (no events). Streamed, it yields
        `mstar.events` objects (`TextDelta.text`, audio chunks, images, tensors, then
        `Finished`); an error event raises."""
        body = generate_payload(request, fields, stream=stream, binary=binary)
        return self._stream(protocol.GENERATE, body) if stream else \
            self._request(protocol.GENERATE, body)

    def act(self, request: Mapping[str, Any] | None = None, *, binary: bool = False,
            **fields: Any) -> np.ndarray:
        """An action chunk (models with the "actions" capability), e.g.
        `client.act(images={"base_0_rgb": frame}, prompt="fold the towel", state=q)`:
        `generate` with the model's fields as given (images as arrays, PIL images or
        files), returning its "actions" output, a numpy array [steps, action dim];
        `binary=True` fetches it in the safetensors answer. Unlike `generate`, it first
        checks the capability."""
        self._require("actions", "act")
        return protocol.actions(self._request(protocol.GENERATE, generate_payload(
            request, fields, stream=False, binary=binary)))

    def encode_video(self, video: object, *, binary: bool = False,
                     **fields: Any) -> np.ndarray:
        """A clip's latents (models with the "latents" capability), the model's `latents`
        output (V-JEPA 2: [tokens, dim]; V-JEPA 2-AC, each frame alone: [frames, tokens,
        dim]): `video` a file path, `pathlib.Path`, bytes, an http(s) or `data:` URL (the
        server decodes and samples it), or frames as an array ([T, H, W, 3] uint8 or
        [T, 3, H, W] float in [0, 1]); `fields` are the model's own."""
        self._require("latents", "encode_video")
        return world.output(self._request(protocol.GENERATE, generate_payload(
            None, world.encode_fields(video, fields), stream=False, binary=binary)),
            "latents")

    def rollout(self, *, video: object, actions: object, states: object = None,
                steps: int | None = None, stream: bool = False, **fields: Any,
                ) -> np.ndarray | Stream[np.ndarray]:
        """Predicted future latents (models with the "rollout" capability): from the
        context clip `video` of T frames (as `encode_video` takes it), the end-effector
        `states` [T, 7] at its frames and robot `actions` [T - 1 + steps, 7] (one between
        each two context frames, then one per step), `steps` autoregressive steps (None:
        the actions past the context). Returns [steps, tokens, dim]; streamed, a `Stream`
        yielding each step's [tokens, dim] as the server computes it (leaving it early
        ends the rollout on the server)."""
        self._require("rollout", "rollout")
        body = generate_payload(None, world.rollout_fields(video, actions, states, steps,
                                                           fields), stream=stream)
        if stream:
            return self._stream(world.ROLLOUT, body)
        return world.rollout_steps(self._request(protocol.GENERATE, body))

    def plan(self, *, video: object, goal: object, states: object = None,
             samples: int | None = None, iterations: int | None = None,
             horizon: int | None = None, topk: int | None = None, **fields: Any,
             ) -> np.ndarray:
        """Actions toward a goal by model-predictive control (models with the "planning"
        capability; the cross-entropy method): `video` the current observation and `goal`
        the goal image or clip (each as `encode_video` takes it), `states` the
        end-effector states; `samples` candidates per iteration, `iterations`, `horizon`
        steps and `topk` elites (None: the server's defaults, the authors' planner's).
        Returns the planned actions [horizon, 7]; `fields` are the model's own (e.g.
        `seed`, `maxnorm`)."""
        self._require("planning", "plan")
        return world.output(self._request(protocol.GENERATE, generate_payload(
            None, world.plan_fields(video, goal, states, fields, samples=samples,
                                    iterations=iterations, horizon=horizon, topk=topk),
            stream=False)), "actions")

    def tts(self, text: str, *, voice: str | None = None, format: str = "wav",
            model: str | None = None, stream: bool = False, **extra: Any,
            ) -> Speech | ByteStream:
        """Speech from text (`/v1/audio/speech`; models with the "speech" capability):
        a `Speech` (`.audio`, `.format`, `.sample_rate`, `.samples()`, `.to_wav(path)`);
        streamed, a `ByteStream` of the encoded file's pieces as the model speaks. `format`:
        mp3, opus, aac, flac, wav or pcm; `voice` None is the model's default; `extra`
        goes into the body (`speed`, `seed`, `temperature`, `max_tokens`, ...)."""
        self._require("speech", "tts")
        body = protocol.speech_body(text, model=model or self._default_model(), voice=voice,
                                    format=format, extra=extra)
        if not stream:
            return self._request(protocol.SPEECH, body)
        return ByteStream(self._send(protocol.SPEECH, body), self.base_url)

    def transcribe(self, audio: object, *, language: str | None = None,
                   prompt: str | None = None, model: str | None = None, **extra: Any) -> str:
        """The text of an audio file (`/v1/audio/transcriptions`; models with the
        "transcription" capability): `audio` a path (str or `pathlib.Path`) or the file's
        bytes; `language` (ISO-639-1) and `prompt` guide it; `extra` goes into the form
        (`temperature`, `max_completion_tokens`, `seed`, ...)."""
        self._require("transcription", "transcribe")
        payload = protocol.transcription_payload(audio, model=model or self._default_model(),
                                                 language=language, prompt=prompt, extra=extra)
        return self._request(protocol.TRANSCRIPTIONS, payload)

    def generate_image(self, prompt: str, *, size: str | None = None, n: int = 1,
                       model: str | None = None, **fields: Any) -> bytes | list[bytes]:
        """Images from text (`/v1/images/generations`; models with the "images"
        capability): the PNG bytes, a list of them when `n` > 1. `size` "WxH" (None: the
        model's default); `fields` are the model's own (e.g. `seed`)."""
        self._require("images", "generate_image")
        body = protocol.image_body(prompt, model=model or self._default_model(), size=size,
                                   n=n, fields=fields)
        images = self._request(protocol.IMAGES, body)
        return images[0] if n == 1 else images

    def edit_image(self, image: object, prompt: str, *, size: str | None = None, n: int = 1,
                   model: str | None = None, **fields: Any) -> bytes | list[bytes]:
        """An edited image (`/v1/images/edits`; models with the "image_edits"
        capability): `image` a path, bytes, a PIL image or an array [H, W, C]; the rest
        and the answer as `generate_image`."""
        self._require("image_edits", "edit_image")
        payload = protocol.image_edit_payload(image, prompt, size=size, n=n, fields=fields,
                                              model=model or self._default_model())
        images = self._request(protocol.IMAGE_EDITS, payload)
        return images[0] if n == 1 else images

    def models(self) -> list[ModelInfo]:
        return self._request(protocol.MODELS)

    def health(self) -> dict[str, Any]:
        """The server's health as it is now (`{"status": "ok" | "starting" |
        "unhealthy", ...}`); never retried, raises only when the server is unreachable."""
        return self._request(protocol.HEALTH)

    def _served(self) -> list[ModelInfo]:
        """`GET /v1/models`, asked once."""
        if self._listed is None:
            self._listed = self.models()
        return self._listed

    def _default_model(self) -> str:
        return self._model or self._remember_model(self._served())

    def _require(self, capability: str, method: str) -> None:
        protocol.require_capability(self._served(), self._model, capability, method)

    # -- transport ---------------------------------------------------------------------------
    def _send(self, route: protocol.Route, body: Any) -> httpx.Response:
        request = self._http.build_request(route.method, route.path,
                                            **protocol.http_args(body))
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                delay = self._retry.after_transport_error(route, attempt, exc, self.base_url)
                self._log_retry(route, attempt, delay, protocol.retry_reason(exc, None))
            else:
                if response.status_code in route.expect:
                    return response
                self._read(response)
                delay = self._retry.after_status(route, attempt, response)
                self._log_retry(route, attempt, delay, protocol.retry_reason(None, response))
            time.sleep(delay)
            attempt += 1

    def _read(self, response: httpx.Response) -> None:
        try:
            response.read()
        except httpx.TransportError as exc:
            raise protocol.transport_error(exc, self.base_url) from exc
        finally:
            response.close()

    def _request(self, route: protocol.Route[T, Any], body: Any = None) -> T:
        response = self._send(route, body)
        self._read(response)
        return protocol.parse_response(route, response)

    def _stream(self, route: protocol.Route[Any, E], body: Any) -> Stream[E]:
        response = self._send(route, body)
        try:
            reader = protocol.stream_reader(route, response)
        except MStarError:
            response.close()
            raise
        return Stream(response, reader, self.base_url)

    # -- life cycle --------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MStarClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
