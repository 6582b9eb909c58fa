"""Decoding a request's video bytes into RGB frames sampled at a fixed rate, and on request
its audio track.

Video models take a few frames per second, not every frame: `load_video` takes, for each
target time k / fps, the decoded frame nearest to it (ties go to the earlier frame), and
converts only the frames it keeps. The rate is lowered to the video's own frame rate (so a
frame is not taken twice) and, with `max_frames`, so that the frames still span the whole
video. The duration limit is checked on the container's header before any frame is decoded,
and again on each frame's timestamp (a header can lie or be absent); the frame size is
checked against the image pixel limit.

With `audio_rate`, the first audio stream is decoded in the same pass (one demux of both
streams) into mono float32 at that rate, as `load_audio` makes it (channels averaged, soxr),
so a model that hears a video's sound (Qwen3-Omni's `use_audio_in_video`) gets it with the
frames; the track is held to the same duration limit. Once `max_frames` frames are kept, the
video's packets are no longer decoded but the audio's still are (the whole track).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
from av.error import FFmpegError

from mstar.media.audio import Audio, FloatTrack, mono_audio
from mstar.media.limits import MediaError, MediaLimits, too_large


@dataclass(frozen=True)
class Video:
    """Sampled frames and when they occur; `audio`: the audio track (from its first sample)
    when it was asked for and the file has one, else None."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    fps: float  # the sampling rate used
    timestamps: list[float]  # seconds of each frame from the first one
    audio: Audio | None = None


def _header_duration(container: av.container.InputContainer,
                     stream: av.video.stream.VideoStream) -> float | None:
    """Seconds the header states: the video stream's own duration, else the container's."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


class _Sampler:
    """Keeps, for each target time k / rate, the nearest frame seen so far, as frames arrive
    in presentation order."""

    def __init__(self, rate: float, max_frames: int | None):
        self.rate, self.max_frames = rate, max_frames
        self.frames: list[np.ndarray] = []
        self.timestamps: list[float] = []
        self._previous: tuple[float, av.VideoFrame] | None = None
        self._converted: tuple[av.VideoFrame, np.ndarray] | None = None

    @property
    def full(self) -> bool:
        return self.max_frames is not None and len(self.frames) >= self.max_frames

    def _target(self) -> float:
        return len(self.frames) / self.rate

    def _keep(self, time: float, frame: av.VideoFrame) -> None:
        if self._converted is None or self._converted[0] is not frame:
            self._converted = (frame, frame.to_ndarray(format="rgb24"))
        self.frames.append(self._converted[1])
        self.timestamps.append(time)

    def add(self, time: float, frame: av.VideoFrame) -> None:
        """Serve every target up to `time` with this frame or the one before it."""
        while not self.full and self._target() <= time:
            target = self._target()
            if self._previous is not None and target - self._previous[0] <= time - target:
                self._keep(*self._previous)
            else:
                self._keep(time, frame)
        self._previous = (time, frame)

    def finish(self, frame_interval: float) -> None:
        """Serve the targets past the last frame that still fall within half a frame of it."""
        if self._previous is None:
            raise MediaError("the video holds no frames")
        last_time = self._previous[0]
        while not self.full and self._target() < last_time + frame_interval / 2:
            self._keep(*self._previous)


def load_video(data: bytes, limits: MediaLimits, *, fps: float = 2.0,
               max_frames: int | None = None, audio_rate: int | None = None) -> Video:
    """Frames of the first video stream sampled at `fps` (at most its own frame rate; lower
    where `max_frames` would otherwise cut the video short), and with `audio_rate` its first
    audio stream at that rate: 400 for what is not a video, 413 over `max_video_seconds`
    (frames or sound) or a frame over `max_image_pixels`."""
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if audio_rate is not None and audio_rate <= 0:
        raise ValueError(f"audio_rate must be > 0, got {audio_rate}")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except FFmpegError:
        raise MediaError("the media is not a video PyAV can read") from None
    with container:
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise MediaError("the media is a still image, not a video")
        if not container.streams.video:
            raise MediaError("the media has no video stream")
        stream = container.streams.video[0]
        duration = _header_duration(container, stream)
        if duration is not None and duration > limits.max_video_seconds:
            raise too_large(f"the video ({duration:.1f} s)", limits.max_video_seconds,
                            "seconds")
        native = stream.average_rate or stream.guessed_rate
        rate = min(fps, float(native)) if native else fps
        if max_frames is not None and duration:
            rate = min(rate, max_frames / duration)
        frame_interval = 1 / float(native) if native else 1 / rate
        sampler = _Sampler(rate, max_frames)
        sound = container.streams.audio[0] if audio_rate and container.streams.audio else None
        track = FloatTrack(sound) if sound is not None else None
        start, index = None, 0
        try:
            for packet in container.demux(*[s for s in (stream, sound) if s is not None]):
                if track is not None and packet.stream_index == sound.index:
                    for frame in packet.decode():
                        track.add(frame)
                    if track.seconds > limits.max_video_seconds:
                        raise too_large("the video's audio", limits.max_video_seconds,
                                        "seconds")
                    continue
                if sampler.full:
                    if track is None:
                        break
                    continue
                for frame in packet.decode():
                    if frame.width * frame.height > limits.max_image_pixels:
                        raise too_large(f"the video's frames ({frame.width}x{frame.height} "
                                        "pixels)", limits.max_image_pixels, "pixels")
                    time = frame.time if frame.time is not None else index * frame_interval
                    index += 1
                    start = time if start is None else start
                    if time - start > limits.max_video_seconds:
                        raise too_large("the video", limits.max_video_seconds, "seconds")
                    sampler.add(time - start, frame)
        except FFmpegError as exc:
            raise MediaError(f"the video could not be decoded: {exc}") from None
    sampler.finish(frame_interval)
    audio = mono_audio(track.samples(), track.rate, audio_rate) if track is not None else None
    return Video(frames=np.stack(sampler.frames), fps=rate, timestamps=sampler.timestamps,
                 audio=audio)
