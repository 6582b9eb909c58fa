"""Media fetched by the chat route, against a local HTTP server: a found image is used, a
404 and a timeout are 400s naming the content part, an image over the pixel limit is a
413, and with private addresses refused (the default) a loopback URL is never fetched.
The app runs over an in-process deployment (its routes are the server's), with private
URLs allowed where the media server is on loopback."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from test_http import serving, settings

import mstar
from mstar.api_server.app import create_app
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(60)


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 90, 200)).save(buf, "PNG")
    return buf.getvalue()


class Media(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        Media.hits.append(self.path)
        if self.path == "/slow.png":
            time.sleep(3)
        body = {"/cat.png": png((24, 16)), "/huge.png": png((64, 64)),
                "/slow.png": png((8, 8))}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the slow one: the route gave up on it

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def media_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Media)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def backend():
    d = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256)
    yield LocalBackend(d)
    d.close()


def chat(client, url: str):
    return client.post("/v1/chat/completions", json={
        "model": "testvla", "max_tokens": 4, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look: "},
                                         {"type": "image_url", "image_url": {"url": url}}]}]})


def test_fetched_images_and_their_failures(backend, media_url):
    app = create_app(backend, settings(allow_private_media_urls=True, media_fetch_timeout=1.0,
                                       media_max_image_pixels=32 * 32))
    with serving(app) as client:
        ok = chat(client, media_url + "/cat.png")
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["prompt_tokens"] == 1 + len("user: look: ") + 16 + \
            len("\nassistant:")
        for path, status, words in (("/missing.png", 400, "404"),
                                    ("/slow.png", 400, "timed out"),
                                    ("/huge.png", 413, "pixels")):
            response = chat(client, media_url + path)
            error = response.json()["error"]
            assert response.status_code == status and words in error["message"], error
            assert error["param"] == "messages[0].content[1]"


def test_private_urls_are_refused_without_a_fetch(backend, media_url):
    Media.hits.clear()
    with serving(create_app(backend, settings())) as client:
        response = chat(client, media_url + "/cat.png")
    assert response.status_code == 400 and "private" in response.json()["error"]["message"]
    assert Media.hits == []
