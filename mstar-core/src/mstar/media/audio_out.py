"""Encoding a model's audio (mono float32 chunks) into the files clients ask for, as it is
made: `AudioEncoder.encode` returns the bytes each chunk completes, so a response can play
while the model is still speaking.

Every format goes through PyAV (FFmpeg), because each one then streams: soundfile's
encoders (libsndfile) seek back to finish their headers (an MP3's Xing frame is left a
placeholder that makes decoders drop audio) and its Ogg pages hold about a second each.
Streamed, a muxer cannot seek back either, so each format is one that plays from its
first bytes:
- `wav`: RIFF and data sizes 0xFFFFFFFF ("until the end"), then 16-bit PCM;
- `pcm`: raw 16-bit little-endian samples, no header (the rate travels beside it);
- `flac`: STREAMINFO with the total length 0 ("unknown", as FLAC allows), then frames;
- `opus`: Ogg Opus, a page per 20 ms packet; its pre-skip and the last page's granule
  position give decoders the exact length (decoders trim the end only when the audio
  spans two pages or more: a page per packet gives that to all but sub-packet streams);
- `mp3`: MPEG audio frames, no ID3 or Xing header, so any two pieces concatenate;
- `aac`: ADTS frames (AAC-LC).
mp3 and aac have no place for their encoder delay in a stream: decoders give the priming
samples (mp3: 1105 at 16 kHz, aac: 1024) and the last frame's padding as leading and
trailing silence. A whole file (`encode_audio`, or `seekable=True`) gets the headers that
state the length (WAV sizes, FLAC's total, MP3's LAME tag with delay and padding).

Opus, mp3 and aac take certain sample rates only: the audio is resampled (FFmpeg's
swresample) to the nearest one above (`output_rate`). `speed` changes the tempo and keeps
the pitch (FFmpeg's `atempo`, a WSOLA time stretch; resampling would raise the pitch),
and gives exactly `round(n / speed)` samples.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import av.filter
import numpy as np

from mstar.events import AudioChunk

#: Formats the encoder writes (OpenAI's `response_format` values).
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
#: The range of `speed` (OpenAI's).
SPEED_RANGE = (0.25, 4.0)

_MP3_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True)
class _Format:
    container: str
    codec: str
    media_type: str
    rates: tuple[int, ...] | None = None  # None: any rate
    bit_rate: int | None = None
    options: dict[str, str] = field(default_factory=dict)


_FORMATS = {
    "mp3": _Format("mp3", "libmp3lame", "audio/mpeg", _MP3_RATES, 64_000,
                   {"id3v2_version": "0"}),
    "opus": _Format("ogg", "libopus", "audio/ogg", (8000, 12000, 16000, 24000, 48000), 32_000,
                    {"page_duration": "20000"}),
    "aac": _Format("adts", "aac", "audio/aac", (7350, *_MP3_RATES, 64000, 88200, 96000),
                   64_000),
    "flac": _Format("flac", "flac", "audio/flac", options={"metadata_header_padding": "0"}),
    "wav": _Format("wav", "pcm_s16le", "audio/wav"),
    "pcm": _Format("s16le", "pcm_s16le", "audio/pcm"),
}


def _spec(fmt: str) -> _Format:
    if fmt not in _FORMATS:
        raise ValueError(f"unknown audio format {fmt!r}; supported: {', '.join(FORMATS)}")
    return _FORMATS[fmt]


def media_type(fmt: str) -> str:
    """The Content-Type of a `fmt` response."""
    return _spec(fmt).media_type


def output_rate(fmt: str, sample_rate: int) -> int:
    """The rate `fmt` encodes audio of `sample_rate` at: the same where the codec takes it,
    else the nearest rate above that it takes (the highest when none is above)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    rates = _spec(fmt).rates
    if rates is None or sample_rate in rates:
        return sample_rate
    return min((r for r in rates if r > sample_rate), default=max(rates))


def check_speed(speed: float) -> None:
    """ValueError outside `SPEED_RANGE` (OpenAI's; also where atempo stays natural)."""
    low, high = SPEED_RANGE
    if not low <= speed <= high:
        raise ValueError(f"speed must be in [{low:g}, {high:g}], got {speed:g}")


class _Pipe(io.RawIOBase):
    """A write-only, non-seekable file: FFmpeg writes each byte once, in order, and
    `take()` hands over what it wrote so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class _Tempo:
    """FFmpeg's `atempo` (0.5 to 100 per stage; chained below 0.5) over float chunks. It
    is fed blocks of at least 10 ms (a frame too short to shrink fails in FFmpeg). Its
    windows hold back up to ~100 ms, and a stream shorter than a window would come out
    empty: the end is padded with silence and the output cut to `round(input / speed)`
    samples, so every length comes out exact."""

    _PAD_S = 0.25  # silence pushed at the end: more than atempo holds back

    def __init__(self, speed: float, sample_rate: int):
        self._speed, self._rate = speed, sample_rate
        self._block = max(sample_rate // 100, 16)
        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono",
                                       time_base=Fraction(1, sample_rate))
        stages = []
        while speed < 0.5:
            stages.append(0.5)
            speed /= 0.5
        for factor in (*stages, speed):
            stage = self._graph.add("atempo", f"{factor:.6f}")
            node.link_to(stage)
            node = stage
        node.link_to(self._graph.add("abuffersink"))
        self._graph.configure()
        self._held: list[np.ndarray] = []
        self._in = self._fed = self._out = 0

    def push(self, samples: np.ndarray) -> list[av.AudioFrame]:
        self._held.append(samples)
        self._in += len(samples)
        if self._in - self._fed < self._block:
            return []
        self._feed(np.concatenate(self._held))
        return self._pull(None)

    def finish(self) -> list[av.AudioFrame]:
        """The rest: through the padding, cut at the exact length."""
        target = round(self._in / self._speed)
        self._feed(np.concatenate([*self._held, np.zeros(int(self._PAD_S * self._rate),
                                                         dtype=np.float32)]))
        self._graph.push(None)
        return self._pull(target)

    def _feed(self, samples: np.ndarray) -> None:
        frame = _frame(samples[None, :], self._rate)
        frame.pts = self._fed
        self._fed += len(samples)
        self._held = []
        self._graph.push(frame)

    def _pull(self, limit: int | None) -> list[av.AudioFrame]:
        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.BlockingIOError, av.EOFError):
                return out
            if limit is not None and self._out + frame.samples > limit:
                keep = max(limit - self._out, 0)
                if keep == 0:
                    continue
                frame = _frame(frame.to_ndarray()[:, :keep], self._rate)
            self._out += frame.samples
            out.append(frame)


def _frame(samples: np.ndarray, rate: int) -> av.AudioFrame:
    """A mono float frame of `samples` [1, n]."""
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="flt",
                                       layout="mono")
    frame.sample_rate = rate
    return frame


class AudioEncoder:
    """One audio stream of `fmt` from mono float32 chunks at `sample_rate`: `encode(chunk)`
    returns the bytes that chunk completes (often b"": codecs work in frames), `finish()`
    the rest. With `seekable=True` everything comes from `finish()`, a whole file whose
    headers state its length. `close()` drops an unfinished stream (its client left)."""

    def __init__(self, fmt: str, sample_rate: int, *, speed: float = 1.0,
                 seekable: bool = False):
        spec = _spec(fmt)
        check_speed(speed)
        self.format = fmt
        self.input_rate = sample_rate
        self.sample_rate = output_rate(fmt, sample_rate)
        self._file: io.BytesIO | _Pipe = io.BytesIO() if seekable else _Pipe()
        # bitexact: no encoder version strings, so the same audio gives the same bytes
        self._container = av.open(self._file, "w", format=spec.container,
                                  options={"fflags": "+bitexact", **spec.options})
        self._stream = self._container.add_stream(spec.codec, rate=self.sample_rate,
                                                  layout="mono")
        if spec.bit_rate is not None:
            self._stream.bit_rate = spec.bit_rate
        self._tempo = _Tempo(speed, sample_rate) if speed != 1.0 else None
        self._done = False

    def encode(self, samples: np.ndarray) -> bytes:
        """Encode a chunk (1-D float32 in [-1, 1]; values beyond are clipped)."""
        if self._done:
            raise ValueError("the encoder has finished")
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if samples.size:
            samples = np.clip(samples, -1.0, 1.0)
            self._write([_frame(samples[None, :], self.input_rate)] if self._tempo is None
                        else self._tempo.push(samples))
        return self._take()

    def finish(self) -> bytes:
        """Flush the codec and the container: the stream's last bytes (or the whole file)."""
        if self._done:
            raise ValueError("the encoder has finished")
        self._write(([] if self._tempo is None else self._tempo.finish()) + [None])
        self._container.start_encoding()  # the header, even for a stream without samples
        self._done = True
        self._container.close()
        if isinstance(self._file, io.BytesIO):
            return self._file.getvalue()
        return self._file.take()

    def close(self) -> None:
        """Release the codec whether or not the stream was finished; safe to repeat."""
        if not self._done:
            self._done = True
            self._container.close()

    def _write(self, frames: list[av.AudioFrame | None]) -> None:
        """Encode and mux `frames` (None flushes the codec)."""
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def _take(self) -> bytes:
        return self._file.take() if isinstance(self._file, _Pipe) else b""


def chunk_samples(chunk: AudioChunk) -> np.ndarray:
    """A model's audio chunk as float32 samples (float32 by the contract; numpy reads any
    float width)."""
    return np.frombuffer(chunk.samples.data, dtype=chunk.samples.dtype).astype(np.float32)


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str, *,
                 speed: float = 1.0) -> bytes:
    """A whole file of `fmt` holding `samples` (mono float32 at `sample_rate`)."""
    encoder = AudioEncoder(fmt, sample_rate, speed=speed, seekable=True)
    try:
        encoder.encode(samples)
        return encoder.finish()
    finally:
        encoder.close()


__all__ = ["FORMATS", "SPEED_RANGE", "AudioEncoder", "check_speed", "chunk_samples",
           "encode_audio", "media_type", "output_rate"]
