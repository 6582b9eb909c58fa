"""mstar.media: fetching (a real local HTTP server; the SSRF guard with DNS answers patched
in `socket.getaddrinfo`), data URIs, image/audio/video decoding under limits, uploads."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from urllib.parse import quote

import av
import httpx
import numpy as np
import pytest
import soundfile
from PIL import Image

from mstar.config.settings import ServerSettings
from mstar.media import (
    MediaError,
    MediaLimits,
    UploadStore,
    decode_base64,
    fetch_media,
    load_audio,
    load_image,
    load_video,
    media_hash,
)

LOCAL = MediaLimits(allow_private_urls=True, fetch_timeout_s=2.0)


def png_bytes(size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    color = (200, 100, 50, 255)[:len(mode)]
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def fetch(url: str, limits: MediaLimits = LOCAL, **kwargs) -> bytes:
    return asyncio.run(fetch_media(url, limits, **kwargs))


def refusal(url: str, limits: MediaLimits = MediaLimits(), **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        fetch(url, limits, **kwargs)
    return info.value


# ------------------------------------------------------------------------------------------
# A local HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []
    stop = threading.Event()

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: bool = True) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.hits.append(self.path)
        try:
            if self.path == "/image.png":
                self._send(200, PNG, {"Content-Type": "image/png"})
            elif self.path == "/redirect":
                self._send(302, headers={"Location": "/image.png"})
            elif self.path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif self.path == "/slow":
                self.stop.wait(3.0)
                self._send(200, PNG)
            elif self.path == "/drip":  # each byte comes quickly; the whole body does not
                self.send_response(200)
                self.end_headers()
                for _ in range(40):
                    if self.stop.wait(0.1):
                        break
                    self.wfile.write(b"x")
                    self.wfile.flush()
            elif self.path == "/huge":
                self._send(200, b"\0" * 100_000)
            elif self.path == "/huge-undeclared":  # HTTP/1.0: the body ends at close
                self._send(200, b"\0" * 100_000, length=False)
            else:
                self._send(404, b"no such thing")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up first, as the limit tests intend


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Host names the test makes resolve to chosen addresses; others resolve as usual."""
    answers: dict[str, list[str]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):  # noqa: A002
        if host not in answers:
            return real(host, port, family, type, proto, flags)
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


# ------------------------------------------------------------------------------------------
# Fetching


def test_fetch_an_image_and_follow_a_redirect(server):
    assert fetch(f"{server}/image.png") == PNG
    assert fetch(f"{server}/redirect") == PNG
    assert load_image(fetch(f"{server}/image.png"), LOCAL).size == (8, 6)


def test_fetch_http_errors_name_the_status(server):
    error = refusal(f"{server}/missing", LOCAL)
    assert error.status == 400 and "404" in str(error)
    error = refusal(f"{server}/loop", MediaLimits(allow_private_urls=True, max_redirects=2))
    assert error.status == 400 and "more than 2 redirects" in str(error)


def test_fetch_times_out_on_the_whole_fetch(server):
    limits = MediaLimits(allow_private_urls=True, fetch_timeout_s=0.4)
    # no response for 3 s; a body that trickles for 4 s: a "timed out" refusal means the
    # 0.4 s deadline ended the fetch before the server did
    for path in ("/slow", "/drip"):
        error = refusal(f"{server}{path}", limits)
        assert error.status == 400 and "timed out" in str(error)


def test_fetch_enforces_the_size_limit(server):
    limits = MediaLimits(allow_private_urls=True, max_bytes=10_000)
    for path in ("/huge", "/huge-undeclared"):  # by Content-Length; while streaming
        assert refusal(f"{server}{path}", limits).status == 413
    assert fetch(f"{server}/huge", MediaLimits(allow_private_urls=True)) == b"\0" * 100_000


def test_private_addresses_are_refused_without_contacting_them(server):
    port = server.rsplit(":", 1)[1]
    before = len(_Handler.hits)
    for url in (f"http://127.0.0.1:{port}/image.png", f"http://[::1]:{port}/image.png",
                f"http://[::ffff:127.0.0.1]:{port}/image.png",
                f"http://2130706433:{port}/image.png",  # 127.0.0.1 as one decimal number
                "http://10.1.2.3/x.png", "http://169.254.169.254/latest/meta-data",
                "http://[fe80::1]/x", "http://0.0.0.0/x", "http://224.0.0.1/x",
                "http://100.64.0.1/x", "http://[2002:7f00:1::1]/x"):  # 6to4 of 127.0.0.1
        error = refusal(url)
        assert error.status == 400 and "not a public address" in str(error), url
    assert len(_Handler.hits) == before


def test_unsupported_schemes_are_refused():
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x", "/etc/passwd"):
        error = refusal(url)
        assert error.status == 400 and "only http, https and data" in str(error)


def test_a_host_with_any_private_answer_is_refused(dns):
    dns["mixed.example"] = ["93.184.216.34", "10.0.0.7"]
    assert "10.0.0.7" in str(refusal("http://mixed.example/a.png"))


def test_requests_are_pinned_to_the_checked_address_and_redirects_rechecked(dns):
    """The first hop (a public name) is allowed and sent to the address that was checked,
    with the name kept in Host and TLS SNI; its redirects to private targets (by address, or
    by a name that resolves privately) are refused before any connection."""
    dns["media.example"] = ["93.184.216.34"]
    dns["internal.example"] = ["192.168.1.20"]
    seen: list[httpx.Request] = []

    def route(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        target = {"/to-loopback": "http://127.0.0.1:8000/secret",
                  "/to-internal": "https://internal.example/secret"}.get(request.url.path)
        if target is not None:
            return httpx.Response(302, headers={"Location": target})
        return httpx.Response(200, content=PNG)

    async def run(url: str) -> bytes:
        async with httpx.AsyncClient(transport=httpx.MockTransport(route)) as client:
            return await fetch_media(url, MediaLimits(), client=client)

    assert asyncio.run(run("https://media.example/a.png")) == PNG
    request = seen[-1]
    assert request.url.host == "93.184.216.34" and request.headers["host"] == "media.example"
    assert request.extensions["sni_hostname"] == "media.example"
    for path, address in (("/to-loopback", "127.0.0.1"), ("/to-internal", "192.168.1.20")):
        count = len(seen)
        with pytest.raises(MediaError, match=address) as info:
            asyncio.run(run(f"http://media.example{path}"))
        assert info.value.status == 400 and len(seen) == count + 1  # only the first hop


# ------------------------------------------------------------------------------------------
# Data URIs and hashes


def test_data_uris():
    encoded = base64.b64encode(PNG).decode()
    assert fetch(f"data:image/png;base64,{encoded}", MediaLimits()) == PNG
    assert fetch(f"data:image/png;base64,{quote(encoded)}", MediaLimits()) == PNG
    assert fetch("data:text/plain,hello%20world", MediaLimits()) == b"hello world"
    assert decode_base64(base64.urlsafe_b64encode(PNG).decode().rstrip("="),
                         MediaLimits()) == PNG
    text = fetch("data:text/plain;base64," + base64.b64encode(b"just text").decode(),
                 MediaLimits())
    with pytest.raises(MediaError, match="is not an image Pillow can read") as info:
        load_image(text, MediaLimits())
    assert info.value.status == 400
    assert refusal(f"data:image/png;base64,{encoded}", MediaLimits(max_bytes=50)).status == 413
    assert refusal("data:text/plain," + "a" * 500, MediaLimits(max_bytes=100)).status == 413
    assert refusal("data:image/png;base64,not*base64!").status == 400
    assert refusal("data:image/png;base64").status == 400  # no comma


def test_media_hash_is_stable_blake2b_128():
    assert media_hash(b"abc") == "cf4ab791c62b8d2b2109c90275287816"
    assert media_hash(PNG) == media_hash(bytes(PNG)) != media_hash(PNG + b"\0")


# ------------------------------------------------------------------------------------------
# Images


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but carries none (so any attempt to decode
    it would fail with a 400, not our 413)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        for body in (b"IHDR" + ihdr, b"IEND"))


def test_image_pixel_limit_is_checked_before_decoding():
    for size in ((100_000, 100_000), (5000, 5000)):  # Pillow's own bomb guard; ours
        with pytest.raises(MediaError, match="exceeds the limit") as info:
            load_image(_png_header(*size), MediaLimits())
        assert info.value.status == 413
    assert load_image(png_bytes((8, 8)), MediaLimits(max_image_pixels=64)).size == (8, 8)
    with pytest.raises(MediaError) as info:
        load_image(png_bytes((8, 8)), MediaLimits(max_image_pixels=63))
    assert info.value.status == 413


def test_images_come_back_rgb_and_only_from_raster_formats():
    image = load_image(png_bytes(mode="RGBA"), MediaLimits())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (200, 100, 50)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(MediaError, match="not an image"):  # Pillow would run Ghostscript
        load_image(eps, MediaLimits())
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    with pytest.raises(MediaError, match="could not be decoded"):
        load_image(buffer.getvalue()[:2000], MediaLimits())  # header fine, pixels cut off


# ------------------------------------------------------------------------------------------
# Audio


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def _sine(frequency: float, seconds: float, rate: int) -> np.ndarray:
    return np.sin(2 * np.pi * frequency * np.arange(int(seconds * rate)) / rate) \
        .astype(np.float32)


def _peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)])


def test_audio_mono_and_resampled():
    sine = _sine(440.0, 1.0, 16_000)
    stereo = np.stack([sine, 0.5 * sine], axis=1)
    audio = load_audio(_wav(stereo, 16_000), MediaLimits())
    assert audio.sample_rate == 16_000 and audio.samples.dtype == np.float32
    np.testing.assert_allclose(audio.samples, 0.75 * sine, atol=1e-6)
    resampled = load_audio(_wav(sine, 16_000), MediaLimits(), sample_rate=24_000)
    assert resampled.sample_rate == 24_000 and resampled.samples.dtype == np.float32
    assert abs(len(resampled.samples) - 24_000) <= 2
    assert abs(_peak_hz(resampled.samples, 24_000) - 440.0) <= 1.0
    assert abs(np.abs(resampled.samples[2000:-2000]).max() - 1.0) < 0.01


def test_audio_duration_limit_and_bad_audio():
    wav = _wav(_sine(440.0, 2.0, 8000), 8000)
    with pytest.raises(MediaError, match="exceeds the limit") as info:
        load_audio(wav, MediaLimits(max_audio_seconds=1.0))
    assert info.value.status == 413
    assert len(load_audio(wav, MediaLimits(max_audio_seconds=2.0)).samples) == 16_000
    for data in (b"this is not audio" * 20, PNG):
        with pytest.raises(MediaError) as info:
            load_audio(data, MediaLimits())
        assert info.value.status == 400


def test_audio_libsndfile_cannot_read_goes_through_pyav():
    """AAC in MP4 (what phones record): PyAV decodes it, with the same limits."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16_000)
        frame = av.AudioFrame.from_ndarray(_sine(440.0, 1.0, 16_000)[None], format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = 16_000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    audio = load_audio(buffer.getvalue(), MediaLimits())
    assert audio.sample_rate == 16_000 and 16_000 <= len(audio.samples) <= 17_000
    assert abs(_peak_hz(audio.samples, 16_000) - 440.0) <= 2.0
    with pytest.raises(MediaError) as info:
        load_audio(buffer.getvalue(), MediaLimits(max_audio_seconds=0.5))
    assert info.value.status == 413


# ------------------------------------------------------------------------------------------
# Video


def _video(seconds: int = 2, rate: int = 10, size: int = 32) -> bytes:
    """An MP4 whose frame i is a flat gray of intensity 10 + 10 i (lossless H.264)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={"crf": "0"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(seconds * rate):
            image = np.full((size, size, 3), 10 + 10 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def _frame_numbers(frames: np.ndarray) -> list[int]:
    return [round((float(frame.mean()) - 10) / 10) for frame in frames]


def test_video_sampled_at_fps_takes_the_nearest_frames():
    video = load_video(_video(), MediaLimits(), fps=2.0)
    assert video.frames.shape == (4, 32, 32, 3) and video.frames.dtype == np.uint8
    assert video.fps == 2.0
    np.testing.assert_allclose(video.timestamps, [0.0, 0.5, 1.0, 1.5], atol=1e-6)
    assert _frame_numbers(video.frames) == [0, 5, 10, 15]
    assert all(abs(float(frame.mean()) - (10 + 10 * n)) < 3
               for frame, n in zip(video.frames, [0, 5, 10, 15]))


def test_video_rate_is_capped_by_the_video_and_by_max_frames():
    every = load_video(_video(), MediaLimits(), fps=30.0)  # the video has 10 fps
    assert every.fps == 10.0 and _frame_numbers(every.frames) == list(range(20))
    spread = load_video(_video(), MediaLimits(), fps=2.0, max_frames=3)  # 1.5 fps over 2 s
    assert spread.fps == 1.5 and _frame_numbers(spread.frames) == [0, 7, 13]
    np.testing.assert_allclose(spread.timestamps, [0.0, 0.7, 1.3], atol=1e-6)


def test_video_duration_limit_and_bad_videos():
    with pytest.raises(MediaError, match="exceeds the limit") as info:
        load_video(_video(), MediaLimits(max_video_seconds=1.0))
    assert info.value.status == 413
    with pytest.raises(MediaError) as info:
        load_video(_video(size=32), MediaLimits(max_image_pixels=32 * 31))
    assert info.value.status == 413
    for data, message in ((b"definitely not a video" * 30, "not a video"),
                          (PNG, "still image"),
                          (_wav(_sine(440, 0.5, 8000), 8000), "no video stream")):
        with pytest.raises(MediaError, match=message) as info:
            load_video(data, MediaLimits())
        assert info.value.status == 400


def _video_with_sound(seconds: float = 2.0, sound_seconds: float | None = None,
                      frequency: float = 440.0, rate: int = 48_000) -> bytes:
    """An MP4: 10 fps of gray frames (H.264) and a stereo AAC track of a sine at
    `frequency` (the right channel at half amplitude), `sound_seconds` long."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        video = container.add_stream("libx264", rate=10)
        video.width = video.height = 32
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="stereo")
        for i in range(int(seconds * 10)):
            image = np.full((32, 32, 3), 10 + 10 * i, dtype=np.uint8)
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        sine = _sine(frequency, sound_seconds or seconds, rate)
        frame = av.AudioFrame.from_ndarray(np.stack([sine, 0.5 * sine]), format="fltp",
                                           layout="stereo")
        frame.sample_rate, frame.pts = rate, 0
        for packet in [*sound.encode(frame), *sound.encode()]:
            container.mux(packet)
    return buffer.getvalue()


def test_video_audio_track_decoded_at_the_asked_rate():
    """The sound of a 2 s clip at 16 kHz: mono (the channels' mean, 0.75 of the sine),
    2 s long (AAC adds at most a frame of priming), the sine's frequency; the frames are
    those of a silent video."""
    data = _video_with_sound(frequency=1000.0)
    video = load_video(data, MediaLimits(), fps=2.0, audio_rate=16_000)
    assert _frame_numbers(video.frames) == [0, 5, 10, 15]
    audio = video.audio
    assert audio is not None and audio.sample_rate == 16_000
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert 32_000 <= len(audio.samples) <= 32_000 + 1024 * 16_000 // 48_000 + 1
    assert abs(_peak_hz(audio.samples, 16_000) - 1000.0) <= 1.0
    middle = audio.samples[8_000:24_000]
    assert abs(float(np.abs(middle).max()) - 0.75) < 0.05
    # At its own rate (48 kHz) unless asked; not decoded at all without `audio_rate`.
    native = load_video(data, MediaLimits(), audio_rate=48_000).audio
    assert native is not None and 96_000 <= len(native.samples) <= 97_100
    assert load_video(data, MediaLimits()).audio is None
    # max_frames stops the frames early, never the sound.
    few = load_video(data, MediaLimits(), fps=10.0, max_frames=2, audio_rate=16_000)
    assert len(few.frames) == 2 and few.audio is not None
    assert len(few.audio.samples) >= 32_000


def test_video_without_sound_has_no_audio_and_long_sound_is_refused():
    assert load_video(_video(), MediaLimits(), audio_rate=16_000).audio is None
    # 1 s of frames but 3 s of sound: the video stream's header says 1 s, the sound is
    # over a 2 s limit.
    data = _video_with_sound(seconds=1.0, sound_seconds=3.0)
    with pytest.raises(MediaError, match="audio exceeds the limit") as info:
        load_video(data, MediaLimits(max_video_seconds=2.0), audio_rate=16_000)
    assert info.value.status == 413
    assert len(load_video(data, MediaLimits(max_video_seconds=2.0)).frames) == 2


# ------------------------------------------------------------------------------------------
# Uploads


def test_uploads_save_read_release_purge(tmp_path):
    store = UploadStore(tmp_path / "uploads", MediaLimits(max_bytes=1000))
    path = store.save("req-1", "cat.png", PNG)
    assert path == tmp_path / "uploads" / "req-1" / "cat.png" and path.read_bytes() == PNG
    assert store.read("req-1", "cat.png") == PNG
    store.save("req-2", "voice.wav", b"RIFF")
    with pytest.raises(MediaError, match="no file named"):
        store.read("req-2", "cat.png")  # a request sees only its own uploads
    with pytest.raises(MediaError, match="already uploaded"):
        store.save("req-1", "cat.png", b"other")
    assert store.read("req-1", "cat.png") == PNG
    with pytest.raises(MediaError) as info:
        store.save("req-1", "big.bin", b"\0" * 1001)
    assert info.value.status == 413
    store.release("req-1")
    assert not (tmp_path / "uploads" / "req-1").exists()
    assert (tmp_path / "uploads" / "req-2" / "voice.wav").exists()
    store.release("never-uploaded")
    again = UploadStore(tmp_path / "uploads", MediaLimits())  # its own directory: accepted
    again.purge()
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [".mstar-uploads"]


def test_uploads_refuse_traversal_and_foreign_directories(tmp_path):
    store = UploadStore(tmp_path / "uploads", MediaLimits())
    for name in ("../evil.png", "a/b.png", "..", ".", "", "a\\b.png", "x\0y", "/etc/passwd",
                 "n" * 256):
        with pytest.raises(MediaError, match="refused the upload file name") as info:
            store.save("req", name, PNG)
        assert info.value.status == 400
    for request_id in ("../req", "a/b", "..", ".hidden", ""):
        with pytest.raises(MediaError, match="invalid request id"):
            store.save(request_id, "ok.png", PNG)
    assert not any((tmp_path / "uploads").rglob("*.png"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="choose a new or empty one"):
        UploadStore(tmp_path / "mine", MediaLimits())
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------------------------------
# Settings


def test_server_settings_give_the_media_limits(monkeypatch):
    assert ServerSettings().media_limits() == MediaLimits()
    monkeypatch.setenv("MSTAR_ALLOW_PRIVATE_MEDIA_URLS", "1")
    settings = ServerSettings(media_max_bytes=1000, media_max_image_pixels=64,
                              media_max_audio_seconds=5, media_max_video_seconds=7,
                              media_fetch_timeout=0.5)
    assert settings.media_limits() == MediaLimits(
        max_bytes=1000, max_image_pixels=64, max_audio_seconds=5.0, max_video_seconds=7.0,
        fetch_timeout_s=0.5, allow_private_urls=True)
