"""Reading the audio a speech call returned, for `Speech.samples()` and `Speech.to_wav()`.

numpy, soundfile and PyAV are imported only here, when audio is decoded, so importing the
SDK needs none of them. soundfile (libsndfile) reads WAV, FLAC, Ogg Opus and MP3; PyAV
reads what it cannot: AAC, and a FLAC that was streamed, whose header cannot state the
length (libsndfile then cannot read it to the end).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

#: libsndfile's frame count when a header states no length is (close to) 2**63.
_UNKNOWN_LENGTH = 2 ** 62


def container_rate(audio: bytes, fmt: str) -> int | None:
    """The sample rate the file's header states (None for pcm, or an unreadable header)."""
    if fmt == "pcm":
        return None
    import soundfile

    try:
        return soundfile.info(io.BytesIO(audio)).samplerate
    except soundfile.SoundFileError:
        pass
    import av

    try:
        with av.open(io.BytesIO(audio)) as container:
            streams = container.streams.audio
            return streams[0].rate if streams else None
    except av.FFmpegError:
        return None


def decode(audio: bytes, fmt: str, sample_rate: int | None,
           dtype: Literal["float32", "int16"] = "float32") -> tuple[np.ndarray, int]:
    """(mono samples, rate): float32 in [-1, 1], or int16 (lossless formats read exactly).
    `sample_rate` is needed for pcm only (it has no header)."""
    import numpy as np

    if fmt == "pcm":
        if sample_rate is None:
            raise ValueError("pcm audio has no header: its sample rate is unknown")
        ints = np.frombuffer(audio, dtype="<i2")
        return (ints.copy() if dtype == "int16" else ints / np.float32(32768)), sample_rate
    import soundfile

    try:
        with soundfile.SoundFile(io.BytesIO(audio)) as file:
            if file.frames < _UNKNOWN_LENGTH:
                samples = file.read(dtype=dtype, always_2d=True)
                return _mono(samples, dtype), file.samplerate
    except soundfile.SoundFileError:
        pass
    return _with_pyav(audio, dtype)


def _mono(samples: np.ndarray, dtype: str) -> np.ndarray:
    import numpy as np

    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0])
    return samples.mean(axis=1).astype(dtype)


def _with_pyav(audio: bytes, dtype: str) -> tuple[np.ndarray, int]:
    import av
    import numpy as np

    with av.open(io.BytesIO(audio)) as container:
        if not container.streams.audio:
            raise ValueError("the answer holds no audio stream")
        stream = container.streams.audio[0]
        to_mono = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        parts = [converted.to_ndarray().reshape(-1) for frame in container.decode(stream)
                 for converted in to_mono.resample(frame)]
        parts += [converted.to_ndarray().reshape(-1) for converted in to_mono.resample(None)]
        rate = stream.rate
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    if dtype == "int16":
        return np.clip(np.round(samples * 32768), -32768, 32767).astype(np.int16), rate
    return samples.astype(np.float32, copy=False), rate
