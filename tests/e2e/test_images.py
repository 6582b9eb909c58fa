"""`POST /v1/images/generations` and `/v1/images/edits` through a real `mstar-serve` of
testvla (mode "image": a denoise per image, painted as a PNG), talked to with the official
`openai` client, httpx and our SDK.

Every image is decoded with PIL and its size checked. Same seed, same request: the same
PNG whichever way it is asked for (b64_json, url, SDK), so the route adds nothing of its
own; edits depend on their image (the model conditions on it). Bad input is a 400 naming
the field (413 over the media limit), a model without the capability is told so, expired
URLs are 404, and a client that leaves cancels its request."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serving_harness import openai_client, running_keyed, sdk_client

import mstar
from mstar import AsyncMStarClient, MStarClient
from mstar.api_server.app import create_app
from mstar.api_server.backend import ModelInfo
from mstar.api_server.images_route import ImageFiles
from mstar.client import BadRequestError, UnsupportedCapabilityError
from mstar.config.settings import ServerSettings
from mstar.media import MediaLimits
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(90)

KEY = "sk-test-images"
PROMPT = "a cat in a hat"
MAX_BYTES = 100_000  # the server's --media-max-bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("images-server")
    with running_keyed(tmp, KEY, "--config", "testvla_single", "--preset", "tiny",
                       "--load-format", "dummy", "--upload-dir", str(tmp / "uploads"),
                       "--media-max-bytes", str(MAX_BYTES)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server, KEY)


@pytest.fixture(scope="module")
def sdk(server) -> MStarClient:
    with sdk_client(server, KEY) as c:
        yield c


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def decoded(answer) -> list[bytes]:
    return [base64.b64decode(item.b64_json) for item in answer.data]


def photo(colour: str, size: tuple[int, int] = (20, 20)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


# -- generations ----------------------------------------------------------------------------
def test_generate_gives_n_distinct_pngs_of_the_size(client):
    answer = client.images.generate(model="testvla", prompt=PROMPT, n=2, size="64x48",
                                    extra_body={"seed": 3})
    first, second = decoded(answer)
    assert [png(first).size, png(second).size] == [(64, 48), (64, 48)]
    assert png(first).mode == "RGB" and first != second
    again = decoded(client.images.generate(model="testvla", prompt=PROMPT, n=2,
                                           size="64x48", extra_body={"seed": 3}))
    assert again == [first, second]  # seeded: the same images
    default = decoded(client.images.generate(prompt=PROMPT, size="auto"))  # no model: served
    assert [png(d).size for d in default] == [(32, 32)]


def test_the_model_fields_pass_through(client):
    """`guidance_scale` and `num_steps` are testvla's own: they change the image."""
    plain = decoded(client.images.generate(model="testvla", prompt=PROMPT,
                                           extra_body={"seed": 1}))
    guided = decoded(client.images.generate(model="testvla", prompt=PROMPT, extra_body={
        "seed": 1, "guidance_scale": 3.0, "num_steps": 4}))
    assert png(guided[0]).size == (32, 32) and guided != plain


def test_url_answers_serve_the_same_pngs_without_a_key(client, server):
    b64 = decoded(client.images.generate(model="testvla", prompt=PROMPT, n=2, size="64x48",
                                         extra_body={"seed": 5}))
    answer = client.images.generate(model="testvla", prompt=PROMPT, n=2, size="64x48",
                                    response_format="url", extra_body={"seed": 5})
    urls = [item.url for item in answer.data]
    assert all(url.startswith(server.url + "/v1/images/files/") for url in urls)
    fetched = [httpx.get(url) for url in urls]  # no Authorization: the URL is the secret
    assert [r.status_code for r in fetched] == [200, 200]
    assert [r.headers["content-type"] for r in fetched] == ["image/png"] * 2
    assert [r.content for r in fetched] == b64
    missing = httpx.get(urls[0].rsplit("/", 2)[0] + "/" + "0" * 32 + "/0.png")
    assert missing.status_code == 404 and "expired" in missing.json()["error"]["message"]


def test_image_urls_expire(tmp_path):
    now = [100.0]
    files = ImageFiles(tmp_path / "images", ttl=60, limits=MediaLimits(),
                       clock=lambda: now[0])
    token = files.add([b"first", b"second"])
    assert files.read(token, "1.png") == b"second"
    assert files.read(token, "2.png") is None
    now[0] += 59.9
    assert files.read(token, "0.png") == b"first"
    now[0] += 0.1
    assert files.read(token, "0.png") is None
    assert not (tmp_path / "images" / token).exists()  # the files went with the URL


# -- edits ----------------------------------------------------------------------------------
def test_edit_conditions_on_the_image(client, server):
    def edit(image: bytes, **kw) -> list[bytes]:
        answer = client.images.edit(model="testvla", image=("in.png", image, "image/png"),
                                    prompt=PROMPT, extra_body={"seed": 2}, **kw)
        return decoded(answer)

    red, blue = edit(photo("red"), size="64x48"), edit(photo("blue"), size="64x48")
    assert png(red[0]).size == (64, 48) and red != blue
    assert edit(photo("red"), size="64x48") == red
    generated = decoded(client.images.generate(model="testvla", prompt=PROMPT, size="64x48",
                                               extra_body={"seed": 2}))
    assert generated != red
    two = edit(photo("red"), n=2)
    assert [png(d).size for d in two] == [(32, 32)] * 2 and two[0] != two[1]
    listed = io.BytesIO(photo("red"))
    listed.name = "in.png"
    answer = client.images.edit(model="testvla", image=[listed], prompt=PROMPT,  # image[]
                                size="64x48", extra_body={"seed": 2})
    assert decoded(answer) == red
    url = client.images.edit(model="testvla", image=("in.png", photo("red"), "image/png"),
                             prompt=PROMPT, size="64x48", response_format="url",
                             extra_body={"seed": 2}).data[0].url
    assert httpx.get(url).content == red[0]


# -- the SDK --------------------------------------------------------------------------------
def test_sdk_generate_and_edit_image(sdk, client, server, tmp_path):
    one = sdk.generate_image(PROMPT, size="64x48", seed=3)
    assert isinstance(one, bytes) and png(one).size == (64, 48)
    two = sdk.generate_image(PROMPT, size="64x48", n=2, seed=3)
    assert two == decoded(client.images.generate(model="testvla", prompt=PROMPT, n=2,
                                                 size="64x48", extra_body={"seed": 3}))
    assert two[0] == one
    red = photo("red")
    expected = sdk.edit_image(red, PROMPT, size="64x48", seed=2)
    assert png(expected).size == (64, 48)
    path = tmp_path / "red.png"
    path.write_bytes(red)
    as_array = np.zeros((20, 20, 3), dtype=np.uint8)
    as_array[..., 0] = 255
    for image in (path, str(path), Image.open(io.BytesIO(red)), as_array):
        assert sdk.edit_image(image, PROMPT, size="64x48", seed=2) == expected
    edits = sdk.edit_image(red, PROMPT, n=2, seed=2)
    assert len(edits) == 2 and [png(e).size for e in edits] == [(32, 32)] * 2

    async def run() -> tuple[bytes, bytes]:
        async with AsyncMStarClient(server.url, api_key=KEY, max_retries=0) as aclient:
            return (await aclient.generate_image(PROMPT, size="64x48", seed=3),
                    await aclient.edit_image(red, PROMPT, size="64x48", seed=2))

    assert asyncio.run(run()) == (one, expected)
    with pytest.raises(BadRequestError) as info:
        sdk.generate_image(PROMPT, size="10x10")
    assert info.value.param == "size" and "32x32, 64x48" in info.value.message


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "param", "words"), [
    ({"size": "100x100"}, "size", "allowed sizes: 32x32, 64x48"),
    ({"size": "64x64"}, "size", "allowed sizes: 32x32, 64x48"),
    ({"size": "large"}, "size", "WxH"),
    ({"n": 5}, "n", "at most 4"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": " "}, "prompt", "non-empty"),
    ({"num_steps": 0}, "num_steps", "greater than or equal to 1"),
    ({"guidance_scale": 200.0}, "guidance_scale", "less than or equal to 100"),
    ({"prompt": "word " * 200}, "prompt", "max_seq_len"),
    ({"cfg_text_scale": 4.0}, "cfg_text_scale", "Unrecognized request argument"),
    ({"stream": True}, "stream", "not supported"),
    ({"mode": "text"}, "mode", "set by the route"),
    ({"width": 64}, "width", "set by the route"),
])
def test_bad_generations_are_400_naming_the_field(server, change, param, words):
    response = server.client.post("/v1/images/generations", json={
        "model": "testvla", "prompt": PROMPT, **change})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="dall-e-3", prompt=PROMPT)
    assert info.value.code == "model_not_found"


def noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


RED = ("image", ("a.png", photo("red"), "image/png"))


@pytest.mark.parametrize(("files", "extra", "status", "param", "words"), [
    ([], {}, 400, "image", "needs the image"),
    ([("image", ("x.png", b"not an image at all", "image/png"))], {}, 400, "image", "image"),
    ([("image", ("big.png", noise_png(200), "image/png"))], {}, 413, "image",
     f"limit of {MAX_BYTES} bytes"),
    ([RED, ("mask", ("m.png", photo("white"), "image/png"))], {}, 400, "mask",
     "not supported"),
    ([("image[]", ("a.png", photo("red"), "image/png")),
      ("image[]", ("b.png", photo("blue"), "image/png"))], {}, 400, "image", "got 2 images"),
    ([RED], {"size": "512x512"}, 400, "size", "allowed sizes"),
    ([RED], {"n": "9"}, 400, "n", "at most 4"),
])
def test_bad_edits_are_refused_naming_the_field(server, files, extra, status, param, words):
    data = {"model": "testvla", "prompt": PROMPT, **extra}
    fields = [(name, (None, value)) for name, value in data.items()]  # multipart always
    response = server.client.post("/v1/images/edits", files=fields + files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


class _Without(LocalBackend):
    """testvla as a model without the image capabilities (as Orpheus)."""

    def model_info(self) -> ModelInfo:
        info = super().model_info()
        return {**info, "capabilities": [c for c in info["capabilities"]
                                         if c not in ("images", "image_edits")]}


def test_routes_are_gated_by_the_capabilities_and_url_output_by_its_ttl(tmp_path):
    deployment = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=64)
    try:
        lacking = create_app(_Without(deployment), ServerSettings(api_key=None))
        with TestClient(lacking) as http:
            generation = http.post("/v1/images/generations", json={"model": "testvla",
                                                                   "prompt": PROMPT})
            edit = http.post("/v1/images/edits", data={"model": "testvla", "prompt": PROMPT},
                             files={"image": ("a.png", photo("red"), "image/png")})
        no_urls = create_app(LocalBackend(deployment), ServerSettings(
            api_key=None, image_url_ttl=0, upload_dir=str(tmp_path / "uploads")))
        with TestClient(no_urls) as http:
            url = http.post("/v1/images/generations", json={
                "model": "testvla", "prompt": PROMPT, "response_format": "url"})
            b64 = http.post("/v1/images/generations", json={"model": "testvla",
                                                            "prompt": PROMPT})
    finally:
        deployment.close()
    for response, capability in ((generation, "'images'"), (edit, "'image_edits'")):
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "model" and error["code"] == "unsupported_capability"
        assert capability in error["message"] and "chat, completions" in error["message"]
    assert url.status_code == 400 and url.json()["error"]["param"] == "response_format"
    assert "url output is not enabled" in url.json()["error"]["message"]
    assert b64.status_code == 200 and png(base64.b64decode(b64.json()["data"][0]["b64_json"]))


def test_sdk_refuses_a_model_without_the_capability(server):
    with MStarClient(server.url, api_key=KEY, max_retries=0, model="testvla") as c:
        c._listed = [mstar.client.ModelInfo(id="testvla", capabilities=["chat"],
                                            max_model_len=64, raw={})]
        with pytest.raises(UnsupportedCapabilityError, match="'images'"):
            c.generate_image(PROMPT)
        with pytest.raises(UnsupportedCapabilityError, match="'image_edits'"):
            c.edit_image(photo("red"), PROMPT)


def test_a_client_that_leaves_mid_generation_cancels_it(server):
    rid = "req-images-leaves"
    body = json.dumps({"model": "testvla", "prompt": PROMPT, "n": 4, "num_steps": 1000,
                       "seed": 0}).encode()
    head = ("POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"x-request-id: {rid}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while server.metric("mstar_running_requests") < 1:  # it runs: now leave
            assert time.monotonic() < deadline, "the request never ran"
    server.wait_idle(timeout=30)
    assert f"{rid} cancelled" in server.output()
    assert server.client.get("/health").json() == {"status": "ok"}
    after = server.client.post("/v1/images/generations", json={"prompt": PROMPT})
    assert after.status_code == 200 and len(after.json()["data"]) == 1


def test_the_routes_are_in_the_openapi_document(server):
    paths = server.client.get("/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/images/edits"} <= set(paths)
