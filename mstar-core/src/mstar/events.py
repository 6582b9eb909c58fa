"""Client-facing events: what `generate()` yields and what the server streams.

A msgspec tagged union, so the same objects travel as bytes between processes and turn into
SSE `event: <tag>` lines without a second schema. Tensors travel as raw bytes plus dtype and
shape (`TensorData`), never pickled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec


class TensorData(msgspec.Struct, frozen=True):
    """A tensor as bytes: dtype name (torch's, e.g. "float32"), shape and C-order data."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def from_tensor(cls, t) -> TensorData:
        import torch

        t = t.detach().to("cpu").contiguous()
        flat = t.reshape(-1)
        raw = flat.to(torch.uint8) if t.dtype == torch.bool else flat.view(torch.uint8)
        return cls(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data=raw.numpy().tobytes())

    def to_tensor(self):
        import torch

        dtype = getattr(torch, self.dtype)
        if self.data:
            buf = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        else:
            buf = torch.empty(0, dtype=torch.uint8)
        if dtype == torch.bool:
            return buf.to(torch.bool).reshape(self.shape)
        return buf.view(dtype).reshape(self.shape)


class TokenLogprob(msgspec.Struct, frozen=True):
    """The log-prob of a sampled token and the `top` alternatives (id, log-prob). `token`
    and `top_tokens` are their text, filled by the data worker from the model's tokenizer
    (empty when the model has none)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []
    token: str = ""
    top_tokens: list[str] = []


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="event", frozen=True):
    """New text of one completion (`index` is the child for `n` > 1)."""

    text: str
    token_ids: list[int]
    index: int = 0
    logprobs: list[TokenLogprob] | None = None


class AudioChunk(msgspec.Struct, tag="audio_chunk", tag_field="event", frozen=True):
    """PCM samples (float32 in [-1, 1]) at `sample_rate`, in stream order."""

    samples: TensorData
    sample_rate: int
    index: int = 0


class Image(msgspec.Struct, tag="image", tag_field="event", frozen=True):
    """An encoded image (e.g. PNG bytes)."""

    data: bytes
    mime_type: str = "image/png"
    index: int = 0


class NamedTensor(msgspec.Struct, tag="tensor", tag_field="event", frozen=True):
    """A named model output (actions, latents, predicted frames, streamed features)."""

    name: str
    tensor: TensorData
    index: int = 0


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Finished(msgspec.Struct, tag="finished", tag_field="event", frozen=True):
    """The request ended. `reason`: "stop", "length", "abort", "timeout" or "error";
    `reasons`: each completion's own reason by index where `n` > 1 made several (a stop
    string or EOS ends one, `max_tokens` another)."""

    reason: str
    usage: Usage = Usage()
    index: int | None = None
    reasons: dict[int, str] = {}


class Error(msgspec.Struct, tag="error", tag_field="event", frozen=True):
    """The request failed; `code` is an HTTP-like status (400 bad input, 500 internal)."""

    message: str
    code: int = 500
    type: str = "internal_error"
    param: str | None = None


Event = TextDelta | AudioChunk | Image | NamedTensor | Finished | Error

FinishReason = Literal["stop", "length", "abort", "timeout", "error"]

#: Where a request's events go: called once per event, from the runtime's thread.
Sink = Callable[[Event], None]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> Event:
    return _decoder.decode(data)


__all__ = [
    "AudioChunk",
    "Error",
    "Event",
    "Finished",
    "FinishReason",
    "Image",
    "NamedTensor",
    "Sink",
    "TensorData",
    "TextDelta",
    "TokenLogprob",
    "Usage",
    "decode",
    "encode",
]
