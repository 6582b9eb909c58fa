"""What SDK calls return: small typed views of the server's answers, each keeping the raw
JSON (`raw`) so nothing the server sent is out of reach, and the `x-request-id` to find the
request in the server's log.

Token counts reuse `mstar.events.Usage`, so a chat and a native `/generate` report usage in
one type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar.events import Event, Usage

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class ChatChoice:
    """One completion of a chat request; `text` is its message content ("" if none), or
    the transcript of its spoken reply, whose audio is then `audio` (`chat(audio_out=
    True)`: the file in the asked format, `.samples()`, `.to_wav(path)`)."""

    index: int
    text: str
    finish_reason: str | None
    message: dict[str, Any]
    logprobs: Any = None
    audio: Speech | None = None


@dataclass(frozen=True)
class ChatResponse:
    """A non-streamed chat completion; `text` and `finish_reason` are the first choice's."""

    choices: list[ChatChoice]
    usage: Usage | None
    raw: dict[str, Any]
    request_id: str | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def id(self) -> str | None:
        return self.raw.get("id")

    @property
    def model(self) -> str | None:
        return self.raw.get("model")


@dataclass(frozen=True)
class ChatDelta:
    """One streamed piece of a chat completion: the new `text` of choice `index`; the last
    piece of a choice has its `finish_reason`. A chunk carrying token counts (OpenAI's
    `stream_options={"include_usage": True}`) gives a delta with `usage`, and text "" when
    it has no choices. Streaming a spoken reply (`chat(audio_out=True)`), `text` is the
    transcript's new text and a piece of the audio comes as a delta whose `audio` is that
    piece (pcm16: `.samples()`, `.sample_rate`)."""

    text: str
    index: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    audio: Speech | None = None


@dataclass(frozen=True)
class Audio:
    """An audio output: mono float32 `samples` in [-1, 1] at `sample_rate`."""

    samples: np.ndarray = field(repr=False)
    sample_rate: int

    def to_wav(self, path: str | Path) -> Path:
        """Write it as a 16-bit WAV file (needs soundfile); returns the path."""
        import soundfile

        soundfile.write(path, self.samples, self.sample_rate, format="WAV", subtype="PCM_16")
        return Path(path)


@dataclass(frozen=True)
class GenerateResponse:
    """A non-streamed native `/generate`: every event the model produced (decoded into
    `mstar.events` types: text deltas, audio chunks, images, tensors, then `Finished`),
    `text`, the concatenated text of each completion index ([] when the model made none),
    and `outputs` by name: a tensor as a numpy array (bfloat16 as float32), an image as a
    PIL image, audio as `Audio`. A binary answer (`binary=True`) has the same `outputs` and
    no events; its `raw` is the safetensors metadata. `timing`: the server's `total_ms`
    (receipt to finish) and `first_output_ms`."""

    id: str
    events: list[Event]
    text: list[str]
    finish_reason: str
    usage: Usage
    raw: dict[str, Any] = field(repr=False)
    request_id: str | None = None
    outputs: dict[str, Any] = field(default_factory=dict, repr=False)
    timing: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """A served model as `GET /v1/models` lists it."""

    id: str
    capabilities: list[str]
    max_model_len: int | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Speech:
    """Encoded audio: of a speech call (`tts`), or a chat's spoken reply (or a streamed
    piece of it): the file's bytes as the server encoded them, its `format` (mp3, opus,
    aac, flac, wav or pcm) and `sample_rate` (the header's where the format has one, else
    the server's `x-sample-rate`, or the chat audio's `sample_rate`)."""

    audio: bytes
    format: str
    sample_rate: int | None
    request_id: str | None = None

    def samples(self) -> np.ndarray:
        """Mono float32 samples in [-1, 1] (decoded with soundfile, or PyAV where it
        cannot read the format; needs numpy and soundfile)."""
        from mstar.client._audio import decode

        return decode(self.audio, self.format, self.sample_rate)[0]

    def to_wav(self, path: str | Path) -> Path:
        """Write the audio as a 16-bit WAV file with its sizes filled in (a streamed WAV
        states none), decoding other formats; returns the path."""
        import soundfile

        from mstar.client._audio import decode

        samples, rate = decode(self.audio, self.format, self.sample_rate, dtype="int16")
        soundfile.write(path, samples, rate, format="WAV", subtype="PCM_16")
        return Path(path)


__all__ = ["Audio", "ChatChoice", "ChatDelta", "ChatResponse", "GenerateResponse", "ModelInfo",
           "Speech"]
