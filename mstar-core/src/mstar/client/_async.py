"""`AsyncMStarClient`: the asyncio client, on `httpx.AsyncClient`; the same calls as
`MStarClient`, awaited.

A streamed call is awaited like any other (the server has accepted the request, or the
error is raised, when the await returns) and gives an `AsyncStream` to `async for` over:
`async for event in await client.chat("Hi", stream=True)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
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


class AsyncStream(Generic[E]):
    """A streamed answer, already accepted by the server: `async for` it once. Leaving
    the loop early and `await close()` (or `async with`) end the request on the server."""

    def __init__(self, response: httpx.Response, reader: protocol.FrameReader[E], url: str):
        self.response = response
        self.request_id = protocol.request_id(response)
        self._reader, self._url = reader, url
        self._items = self._iterate()

    async def _iterate(self) -> AsyncIterator[E]:
        try:
            async for line in self.response.aiter_lines():
                for item in self._reader.feed(line):
                    yield item
                if self._reader.done:
                    return
        except httpx.TransportError as exc:
            raise protocol.transport_error(exc, self._url) from exc
        finally:
            await self.response.aclose()
        self._reader.finish()

    def __aiter__(self) -> AsyncIterator[E]:
        return self._items

    async def __anext__(self) -> E:
        return await anext(self._items)

    async def close(self) -> None:
        await self._items.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[E]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncByteStream:
    """A binary answer as it arrives: `async for` it once for `bytes` (see `ByteStream`).
    Leaving early and `await close()` (or `async with`) end the request on the server."""

    def __init__(self, response: httpx.Response, url: str):
        self.response = response
        self.request_id = protocol.request_id(response)
        self._url = url
        self._items = self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self.response.aiter_bytes():
                yield piece
        except httpx.TransportError as exc:
            raise protocol.transport_error(exc, self._url) from exc
        finally:
            await self.response.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._items

    async def __anext__(self) -> bytes:
        return await anext(self._items)

    async def close(self) -> None:
        await self._items.aclose()
        await self.response.aclose()

    async def __aenter__(self) -> AsyncByteStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncMStarClient(ClientBase):
    """An asyncio client for an mstar server: `async with AsyncMStarClient(url) as c:
    (await c.chat("Hi")).text`. Settings as `MStarClient`'s."""

    _HTTP: ClassVar[type[httpx.AsyncClient]] = httpx.AsyncClient
    _http: httpx.AsyncClient

    # -- routes ------------------------------------------------------------------------------
    async def chat(self, text_or_messages: str | Sequence[Mapping[str, Any]], *,
                   images: object = None, model: str | None = None, stream: bool = False,
                   system: str | None = None, max_tokens: int | None = None,
                   temperature: float | None = None, audio_out: bool = False,
                   voice: str | None = None, audio_format: str | None = None, **extra: Any,
                   ) -> ChatResponse | AsyncStream[ChatDelta]:
        """See `MStarClient.chat`."""
        fmt = protocol.chat_audio_format(audio_out, voice, audio_format, stream)
        if fmt is not None:
            await self._require("audio_output", "chat")
        messages = protocol.chat_messages(text_or_messages, images=images, system=system)
        body = protocol.chat_body(messages, model=model or await self._default_model(),
                                  stream=stream, max_tokens=max_tokens,
                                  temperature=temperature, extra=extra, audio_format=fmt,
                                  voice=voice)
        route = protocol.chat_route(fmt)
        return await (self._stream(route, body) if stream else self._request(route, body))

    async def generate(self, request: Mapping[str, Any] | None = None, *,
                       stream: bool = False, binary: bool = False, **fields: Any,
                       ) -> GenerateResponse | AsyncStream[events.Event]:
        """See `MStarClient.generate`."""
        body = generate_payload(request, fields, stream=stream, binary=binary)
        return await (self._stream(protocol.GENERATE, body) if stream else
                      self._request(protocol.GENERATE, body))

    async def act(self, request: Mapping[str, Any] | None = None, *, binary: bool = False,
                  **fields: Any) -> np.ndarray:
        """See `MStarClient.act`."""
        await self._require("actions", "act")
        return protocol.actions(await self._request(protocol.GENERATE, generate_payload(
            request, fields, stream=False, binary=binary)))

    async def encode_video(self, video: object, *, binary: bool = False,
                           **fields: Any) -> np.ndarray:
        """See `MStarClient.encode_video`."""
        await self._require("latents", "encode_video")
        return world.output(await self._request(protocol.GENERATE, generate_payload(
            None, world.encode_fields(video, fields), stream=False, binary=binary)),
            "latents")

    async def rollout(self, *, video: object, actions: object, states: object = None,
                      steps: int | None = None, stream: bool = False, **fields: Any,
                      ) -> np.ndarray | AsyncStream[np.ndarray]:
        """See `MStarClient.rollout`."""
        await self._require("rollout", "rollout")
        body = generate_payload(None, world.rollout_fields(video, actions, states, steps,
                                                           fields), stream=stream)
        if stream:
            return await self._stream(world.ROLLOUT, body)
        return world.rollout_steps(await self._request(protocol.GENERATE, body))

    async def plan(self, *, video: object, goal: object, states: object = None,
                   samples: int | None = None, iterations: int | None = None,
                   horizon: int | None = None, topk: int | None = None, **fields: Any,
                   ) -> np.ndarray:
        """See `MStarClient.plan`."""
        await self._require("planning", "plan")
        return world.output(await self._request(protocol.GENERATE, generate_payload(
            None, world.plan_fields(video, goal, states, fields, samples=samples,
                                    iterations=iterations, horizon=horizon, topk=topk),
            stream=False)), "actions")

    async def tts(self, text: str, *, voice: str | None = None, format: str = "wav",
                  model: str | None = None, stream: bool = False, **extra: Any,
                  ) -> Speech | AsyncByteStream:
        """See `MStarClient.tts`."""
        await self._require("speech", "tts")
        body = protocol.speech_body(text, model=model or await self._default_model(),
                                    voice=voice, format=format, extra=extra)
        if not stream:
            return await self._request(protocol.SPEECH, body)
        return AsyncByteStream(await self._send(protocol.SPEECH, body), self.base_url)

    async def transcribe(self, audio: object, *, language: str | None = None,
                         prompt: str | None = None, model: str | None = None,
                         **extra: Any) -> str:
        """See `MStarClient.transcribe`."""
        await self._require("transcription", "transcribe")
        payload = protocol.transcription_payload(
            audio, model=model or await self._default_model(), language=language,
            prompt=prompt, extra=extra)
        return await self._request(protocol.TRANSCRIPTIONS, payload)

    async def generate_image(self, prompt: str, *, size: str | None = None, n: int = 1,
                             model: str | None = None, **fields: Any) -> bytes | list[bytes]:
        """See `MStarClient.generate_image`."""
        await self._require("images", "generate_image")
        body = protocol.image_body(prompt, model=model or await self._default_model(),
                                   size=size, n=n, fields=fields)
        images = await self._request(protocol.IMAGES, body)
        return images[0] if n == 1 else images

    async def edit_image(self, image: object, prompt: str, *, size: str | None = None,
                         n: int = 1, model: str | None = None, **fields: Any,
                         ) -> bytes | list[bytes]:
        """See `MStarClient.edit_image`."""
        await self._require("image_edits", "edit_image")
        payload = protocol.image_edit_payload(image, prompt, size=size, n=n, fields=fields,
                                              model=model or await self._default_model())
        images = await self._request(protocol.IMAGE_EDITS, payload)
        return images[0] if n == 1 else images

    async def models(self) -> list[ModelInfo]:
        return await self._request(protocol.MODELS)

    async def health(self) -> dict[str, Any]:
        """See `MStarClient.health`."""
        return await self._request(protocol.HEALTH)

    async def _served(self) -> list[ModelInfo]:
        """See `MStarClient._served`."""
        if self._listed is None:
            self._listed = await self.models()
        return self._listed

    async def _default_model(self) -> str:
        return self._model or self._remember_model(await self._served())

    async def _require(self, capability: str, method: str) -> None:
        protocol.require_capability(await self._served(), self._model, capability, method)

    # -- transport ---------------------------------------------------------------------------
    async def _send(self, route: protocol.Route, body: Any) -> httpx.Response:
        request = self._http.build_request(route.method, route.path,
                                            **protocol.http_args(body))
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=True)
            except httpx.TransportError as exc:
                delay = self._retry.after_transport_error(route, attempt, exc, self.base_url)
                self._log_retry(route, attempt, delay, protocol.retry_reason(exc, None))
            else:
                if response.status_code in route.expect:
                    return response
                await self._read(response)
                delay = self._retry.after_status(route, attempt, response)
                self._log_retry(route, attempt, delay, protocol.retry_reason(None, response))
            await asyncio.sleep(delay)
            attempt += 1

    async def _read(self, response: httpx.Response) -> None:
        try:
            await response.aread()
        except httpx.TransportError as exc:
            raise protocol.transport_error(exc, self.base_url) from exc
        finally:
            await response.aclose()

    async def _request(self, route: protocol.Route[T, Any], body: Any = None) -> T:
        response = await self._send(route, body)
        await self._read(response)
        return protocol.parse_response(route, response)

    async def _stream(self, route: protocol.Route[Any, E], body: Any) -> AsyncStream[E]:
        response = await self._send(route, body)
        try:
            reader = protocol.stream_reader(route, response)
        except MStarError:
            await response.aclose()
            raise
        return AsyncStream(response, reader, self.base_url)

    # -- life cycle --------------------------------------------------------------------------
    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMStarClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
