"""`mstar.media.audio_out`: every format round-trips through a real decoder (soundfile;
PyAV for AAC and for a streamed FLAC, whose header states no length), streamed pieces
come before the end and concatenate to a stream that decodes like the whole file, and
`speed` stretches time without moving the pitch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from mstar.client._audio import decode
from mstar.client._protocol import SPEECH_MEDIA_TYPES
from mstar.media.audio_out import (
    FORMATS,
    AudioEncoder,
    encode_audio,
    media_type,
    output_rate,
)

RATE = 16000
MP3_DELAY, MP3_FRAME = 1105, 576  # LAME's priming samples and MPEG-2 frame at 16 kHz
AAC_DELAY, AAC_FRAME = 1024, 1024
LOSSLESS = ("flac", "wav", "pcm")


def tone(n: int = 4001, freq: float = 440.0, rate: int = RATE) -> np.ndarray:
    """A sine with a little noise (so no codec sees a trivially periodic signal)."""
    rng = np.random.default_rng(0)
    t = np.arange(n) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(n)) \
        .astype(np.float32)


def streamed(x: np.ndarray, fmt: str, step: int = 333, **kw) -> tuple[list[bytes], bytes]:
    """(the pieces `encode` returned, the stream: pieces + finish)."""
    encoder = AudioEncoder(fmt, RATE, **kw)
    pieces = [encoder.encode(x[i:i + step]) for i in range(0, len(x), step)]
    return pieces, b"".join(pieces) + encoder.finish()


def rms(a: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def peak_hz(a: np.ndarray) -> float:
    return float(np.argmax(np.abs(np.fft.rfft(a))) * RATE / len(a))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_whole_file_decodes_to_the_samples(fmt):
    x = tone()
    data = encode_audio(x, RATE, fmt)
    y, rate = decode(data, fmt, RATE)
    assert rate == RATE  # the header's (pcm has none: the rate given)
    if fmt == "aac":  # ADTS states no encoder delay: the priming samples come first
        assert len(y) == -(-(len(x) + AAC_DELAY) // AAC_FRAME) * AAC_FRAME
        y = y[AAC_DELAY:AAC_DELAY + len(x)]
    else:  # mp3 through its LAME tag (delay and padding), opus through its granules
        assert len(y) == len(x)
    if fmt in LOSSLESS:  # 16-bit: within one step of the float samples
        assert np.abs(y - x).max() <= 1 / 32768 + 1e-7
    else:  # lossy (Opus' SILK layer need not keep the waveform): the same tone and level
        assert peak_hz(y) == pytest.approx(440.0, abs=5.0)
        assert rms(y) == pytest.approx(rms(x), rel=0.2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_pieces_come_early_and_decode_like_the_whole_file(fmt):
    x = tone(16000)
    pieces, stream = streamed(x, fmt, step=320)  # 20 ms chunks, as a model emits them
    assert sum(1 for p in pieces if p) >= 5, "the stream should not wait for the end"
    whole, _ = decode(encode_audio(x, RATE, fmt), fmt, RATE)
    y, rate = decode(stream, fmt, RATE)
    assert rate == RATE
    if fmt == "mp3":  # a stream has no LAME tag: the priming samples and padding remain
        assert len(y) == -(-(len(x) + MP3_DELAY) // MP3_FRAME) * MP3_FRAME
        y = y[MP3_DELAY:MP3_DELAY + len(x)]
    np.testing.assert_allclose(y, whole, atol=1e-6)


def test_streamed_headers_play_before_the_length_is_known():
    x = tone()
    _, wav = streamed(x, "wav")
    assert wav[4:8] == b"\xff\xff\xff\xff" and wav[40:44] == b"\xff\xff\xff\xff"
    whole = encode_audio(x, RATE, "wav")
    assert int.from_bytes(whole[40:44], "little") == 2 * len(x)
    assert soundfile.info(io.BytesIO(wav)).frames == len(x)  # read to the end
    _, flac = streamed(x, "flac")
    streaminfo_total = int.from_bytes(flac[21:26], "big") & (2 ** 36 - 1)
    assert flac[:4] == b"fLaC" and streaminfo_total == 0  # "unknown", as FLAC allows
    _, mp3 = streamed(x, "mp3")
    assert mp3[:2] == b"\xff\xf3"  # an MPEG-2 Layer III frame at once: no ID3, no Xing
    _, pcm = streamed(x, "pcm")
    assert len(pcm) == 2 * len(x)


def test_concatenated_mp3_streams_play_back_to_back():
    """mp3 pieces are whole frames: two streams joined decode to both."""
    _, a = streamed(tone(3000), "mp3")
    _, b = streamed(tone(5000, freq=330.0), "mp3")
    frames = lambda n: -(-(n + MP3_DELAY) // MP3_FRAME) * MP3_FRAME  # noqa: E731
    assert len(decode(a + b, "mp3", RATE)[0]) == frames(3000) + frames(5000)


@pytest.mark.parametrize("speed", [0.25, 0.5, 2.0, 4.0])
def test_speed_stretches_time_and_keeps_the_pitch(speed):
    x = tone(32000, freq=300.0)
    _, stream = streamed(x, "pcm", step=320, speed=speed)
    y, _ = decode(stream, "pcm", RATE)
    assert len(y) == round(len(x) / speed)
    assert peak_hz(y) == pytest.approx(300.0, abs=3.0)  # resampling would move it


@pytest.mark.parametrize("n, step", [(1, 1), (7, 1), (400, 4), (1000, 333)])
def test_speed_keeps_short_and_finely_chunked_audio(n, step):
    """Shorter than atempo's window, or fed a sample at a time: still every sample."""
    for speed in (0.5, 3.0):
        _, stream = streamed(tone(n), "wav", step=step, speed=speed)
        assert len(decode(stream, "wav", RATE)[0]) == round(n / speed)


def test_rates_clipping_and_refusals():
    assert output_rate("opus", 22050) == 24000 and output_rate("opus", 96000) == 48000
    assert output_rate("mp3", 22050) == 22050 and output_rate("flac", 22050) == 22050
    y, rate = decode(encode_audio(tone(rate=22050), 22050, "opus"), "opus", None)
    assert rate == 24000 and abs(len(y) - 4001 * 24000 / 22050) <= 2
    loud = np.array([2.0, -3.0, 0.5], dtype=np.float32)
    ints, _ = decode(encode_audio(loud, RATE, "wav"), "wav", RATE, dtype="int16")
    assert ints.tolist() == [32767, -32768, 16384]
    with pytest.raises(ValueError, match="supported: mp3, opus, aac, flac, wav, pcm"):
        AudioEncoder("ogg", RATE)
    with pytest.raises(ValueError, match="speed"):
        AudioEncoder("wav", RATE, speed=5.0)
    encoder = AudioEncoder("wav", RATE)
    encoder.finish()
    with pytest.raises(ValueError, match="finished"):
        encoder.encode(loud)
    encoder.close()  # after finish: nothing left to release, and no error


def test_the_sdk_knows_every_content_type():
    assert {media_type(fmt): fmt for fmt in FORMATS} == SPEECH_MEDIA_TYPES


@pytest.mark.parametrize("n", [400, 1000])
def test_a_short_opus_stream_keeps_its_length(n):
    """Under a page's worth of audio, decoders would trim nothing: 20 ms pages keep even a
    25 ms stream on two pages."""
    _, stream = streamed(tone(n), "opus", step=4)
    assert len(decode(stream, "opus", None)[0]) == n
