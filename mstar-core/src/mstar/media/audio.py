"""Decoding a request's audio bytes into mono float32 samples at the rate a model wants.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and, with libsndfile >= 1.1, MP3;
anything it cannot read (AAC/M4A, WebM, ...) goes through PyAV. Both paths check the
duration from the header before decoding where the header states it, and again while
decoding (a header can lie or be absent). Channels are averaged to mono; resampling uses
soxr (the SoX resampler, high quality), which the Hugging Face audio stack also relies on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import soundfile
import soxr
from av.error import FFmpegError

from mstar.media.limits import MediaError, MediaLimits, too_large


@dataclass(frozen=True)
class Audio:
    """Mono samples in [-1, 1] and their rate."""

    samples: np.ndarray  # float32 [num_samples]
    sample_rate: int


def _over(seconds: float, limits: MediaLimits) -> MediaError:
    return too_large(f"the audio ({seconds:.1f} s)", limits.max_audio_seconds, "seconds")


def _with_soundfile(data: bytes, limits: MediaLimits) -> tuple[np.ndarray, int] | None:
    """(samples [n, channels], rate), or None when libsndfile does not know the format."""
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as file:
            rate = file.samplerate
            # libsndfile says 2**63 - 1 frames for a stream of unknown length: not a length
            if 0 < file.frames < 2 ** 62 and file.frames / rate > limits.max_audio_seconds:
                raise _over(file.frames / rate, limits)
            # Read at most one sample past the limit, so an understated header is caught.
            cap = int(limits.max_audio_seconds * rate) + 1
            samples = file.read(cap, dtype="float32", always_2d=True)
    except soundfile.LibsndfileError:
        return None
    if len(samples) / rate > limits.max_audio_seconds:
        raise _over(len(samples) / rate, limits)
    return samples, rate


class FloatTrack:
    """An audio stream's decoded frames gathered as planar float32 at the stream's own rate
    (every channel kept; `mono_audio` averages them, as soundfile's path does)."""

    def __init__(self, stream: av.audio.stream.AudioStream):
        if not stream.rate:
            raise MediaError("the audio stream states no sample rate")
        self.rate = stream.rate
        self._to_float = av.AudioResampler(format="fltp", layout=stream.layout.name,
                                           rate=stream.rate)
        self._chunks: list[np.ndarray] = []
        self.count = 0

    @property
    def seconds(self) -> float:
        return self.count / self.rate

    def add(self, frame: av.AudioFrame) -> None:
        for converted in self._to_float.resample(frame):
            chunk = converted.to_ndarray()  # [channels, n]
            self._chunks.append(chunk)
            self.count += chunk.shape[1]

    def samples(self) -> np.ndarray:
        """[n, channels] float32."""
        if not self._chunks:
            return np.zeros((0, 1), dtype=np.float32)
        return np.concatenate(self._chunks, axis=1).T.astype(np.float32, copy=False)


def _with_pyav(data: bytes, limits: MediaLimits) -> tuple[np.ndarray, int]:
    """(samples [n, channels], rate) of the first audio stream, decoded by FFmpeg."""
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except FFmpegError:
        raise MediaError("the media is not audio that soundfile or PyAV can read") from None
    with container:
        if not container.streams.audio:
            raise MediaError("the media has no audio stream")
        stream = container.streams.audio[0]
        if container.duration is not None and container.duration / av.time_base > \
                limits.max_audio_seconds:
            raise _over(container.duration / av.time_base, limits)
        track = FloatTrack(stream)
        try:
            for frame in container.decode(stream):
                track.add(frame)
                if track.seconds > limits.max_audio_seconds:
                    raise _over(track.seconds, limits)
        except FFmpegError as exc:
            raise MediaError(f"the audio could not be decoded: {exc}") from None
    return track.samples(), track.rate


def mono_audio(samples: np.ndarray, rate: int, sample_rate: int | None = None) -> Audio:
    """Samples [n, channels] at `rate` -> their channel mean, resampled (soxr, high
    quality) to `sample_rate` when given."""
    mono = samples.mean(axis=1, dtype=np.float32)
    if sample_rate is not None and sample_rate != rate and len(mono):
        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32,
                                                                          copy=False)
    return Audio(samples=np.ascontiguousarray(mono), sample_rate=int(sample_rate or rate))


def load_audio(data: bytes, limits: MediaLimits, *, sample_rate: int | None = None) -> Audio:
    """Mono float32 audio from encoded bytes, resampled to `sample_rate` when given: 400 for
    what is not audio (or holds no samples), 413 over `max_audio_seconds`."""
    if sample_rate is not None and sample_rate <= 0:
        raise ValueError(f"sample_rate must be > 0, got {sample_rate}")
    decoded = _with_soundfile(data, limits)
    samples, rate = decoded if decoded is not None else _with_pyav(data, limits)
    if samples.size == 0:
        raise MediaError("the audio holds no samples")
    return mono_audio(samples, rate, sample_rate)
