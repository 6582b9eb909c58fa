"""Media and tensor fields of `/generate` (testvla's `image` and `frame`), in every form a
client may send them: JSON (data URL, http URL, tensor JSON), multipart/form-data with a
`request` part and file parts (named after the field, or referred to as upload://), plain
OpenAI-style form fields, and in-process objects. Each form gives what the plain nested
lists (or the decoded image) give; each bad input is refused naming the field. The app runs
over an in-process deployment (its routes are the server's); one test runs the real
processes."""

from __future__ import annotations

import base64
import io
import json

import httpx
import msgspec
import numpy as np
import pytest
import torch
from conftest import frame, tensors
from PIL import Image
from safetensors.torch import save
from serving_harness import Server
from test_http import serving, settings
from test_openai_media import Media, media_url, png  # noqa: F401 (media_url: a fixture)

import mstar
from mstar import events
from mstar.api_server.app import create_app
from mstar.errors import RequestError
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(120)

ACT = {"prompt": "<image>stack the cups", "mode": "act", "num_steps": 2, "seed": 5}
ROLL = {"prompt": "go", "mode": "rollout", "num_frames": 2}


def picture(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), color).save(buf, "PNG")
    return buf.getvalue()


CAT, DOG = picture((40, 90, 200)), picture((200, 30, 10))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def tensor_json(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(t.numpy().tobytes()).decode()}


def npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy())
    return buf.getvalue()


def multipart(client: httpx.Client, body: dict | None, files: dict, **form: str):
    data = {"request": json.dumps(body)} if body is not None else form
    return client.post("/generate", data=data, files=files)


def outputs(response: httpx.Response, name: str) -> list[torch.Tensor]:
    assert response.status_code == 200, response.text
    evs = [msgspec.json.decode(json.dumps(e), type=events.Event)
           for e in response.json()["events"]]
    return tensors(evs, name)


def assert_error(response: httpx.Response, status: int, param: str, words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.fixture(scope="module")
def dep():
    d = mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256)
    yield d
    d.close()


@pytest.fixture(scope="module")
def client(dep):
    app = create_app(LocalBackend(dep), settings(allow_private_media_urls=True))
    with serving(app) as c:
        yield c


def in_process(dep, request: dict, name: str) -> list[torch.Tensor]:
    return tensors(list(dep.generate(request)), name)


def test_an_image_field_takes_every_form_of_an_image(dep, client, media_url):  # noqa: F811
    want = in_process(dep, {**ACT, "image": Image.open(io.BytesIO(CAT))}, "actions")
    other = in_process(dep, {**ACT, "image": Image.open(io.BytesIO(DOG))}, "actions")
    assert want and not torch.equal(want[0], other[0])  # the image is what decides
    Media.hits.clear()
    answers = {
        "data URL": client.post("/generate", json={**ACT, "image": data_url(CAT)}),
        "http URL": client.post("/generate", json={**ACT, "image": media_url + "/cat.png"}),
        "part named image": multipart(client, ACT, {"image": ("cat.png", CAT)}),
        "upload://": multipart(client, {**ACT, "image": "upload://cat.png"},
                               {"file": ("cat.png", CAT)}),
        "plain form fields": multipart(client, None, {"image": ("cat.png", CAT)},
                                       prompt=ACT["prompt"], mode="act", num_steps="2",
                                       seed="5"),
    }
    assert Media.hits == ["/cat.png"]
    assert png((24, 16)) == CAT  # the media server's cat is this one
    for form, response in answers.items():
        got = outputs(response, "actions")
        assert len(got) == 1 and torch.equal(got[0], want[0]), form


def test_a_tensor_field_takes_json_a_safetensors_part_and_an_npy_part(dep, client):
    start = torch.tensor(frame(23))
    want = in_process(dep, {**ROLL, "frame": start.tolist()}, "frame")
    assert len(want) == 2
    answers = {
        "JSON": client.post("/generate", json={**ROLL, "frame": tensor_json(start)}),
        "safetensors": multipart(client, ROLL, {"frame": ("f.safetensors",
                                                          save({"frame": start}))}),
        "npy": multipart(client, {**ROLL, "frame": "upload://f.npy"},
                         {"x": ("f.npy", npy(start))}),
    }
    for form, response in answers.items():
        got = outputs(response, "frame")
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want)), form


def test_in_process_takes_json_forms_and_objects(dep):
    start = torch.tensor(frame(24))
    want = in_process(dep, {**ROLL, "frame": start.tolist()}, "frame")
    for value in (tensor_json(start), start, start.numpy()):
        got = in_process(dep, {**ROLL, "frame": value}, "frame")
        assert all(torch.equal(a, b) for a, b in zip(got, want)), type(value)
    image = in_process(dep, {**ACT, "image": Image.open(io.BytesIO(CAT))}, "actions")
    for value in (data_url(CAT), CAT):
        assert torch.equal(in_process(dep, {**ACT, "image": value}, "actions")[0], image[0])
    with pytest.raises(RequestError, match="fetched by the HTTP server only") as err:
        dep.generate({**ACT, "image": "https://example.com/cat.png"})
    assert err.value.param == "image"


def test_bad_inputs_are_refused_naming_the_field(client):
    good = tensor_json(torch.tensor(frame(1)))
    for bad, words in (({**good, "dtype": "float64"}, "holds 256 bytes, its data has 128"),
                       ({**good, "shape": [4, 9]}, "holds 144 bytes"),
                       ({**good, "data": "!!"}, "not valid base64"),
                       ({**good, "dtype": "complex64"}, "unsupported tensor dtype")):
        assert_error(client.post("/generate", json={**ROLL, "frame": bad}), 400, "frame", words)
    assert_error(client.post("/generate", json={**ACT, "image": "a cat"}), 400, "image",
                 "an image field takes an http(s) URL")
    assert_error(client.post("/generate", json={**ACT, "image": data_url(b"hello",
                                                                           "text/plain")}),
                 400, "image", "not an image")
    assert_error(multipart(client, ACT, {"picture": ("cat.png", CAT)}), 400, "picture",
                 "fills no field")
    assert_error(client.post("/generate", json={**ACT, "image": "upload://cat.png"}), 400,
                 "image", "no file named 'cat.png'")
    assert_error(multipart(client, {**ACT, "image": data_url(CAT)},
                           {"image": ("cat.png", CAT)}), 400, "image", "given twice")
    assert_error(multipart(client, {**ACT, "image": "upload://dog.png"},
                           {"image2": ("cat.png", CAT)}), 400, "image2", "fills no field")


def test_private_and_too_large_media_are_refused(dep, media_url):  # noqa: F811
    Media.hits.clear()
    with serving(create_app(LocalBackend(dep), settings())) as c:
        assert_error(c.post("/generate", json={**ACT, "image": media_url + "/cat.png"}),
                     400, "image", "not a public address")
    assert Media.hits == []
    small = settings(allow_private_media_urls=True, media_max_bytes=len(CAT) - 1)
    with serving(create_app(LocalBackend(dep), small)) as c:
        for response in (c.post("/generate", json={**ACT, "image": data_url(CAT)}),
                         c.post("/generate", json={**ACT, "image": media_url + "/cat.png"}),
                         multipart(c, ACT, {"image": ("cat.png", CAT)})):
            assert_error(response, 413, "image", "exceeds the limit")


def test_the_openapi_document_shows_media_and_tensor_fields(client):
    operation = client.get("/openapi.json").json()["paths"]["/generate"]["post"]
    content = operation["requestBody"]["content"]
    fields = content["application/json"]["schema"]["properties"]
    kinds = {name: [s.get("x-mstar") for s in fields[name]["anyOf"]]
             for name in ("image", "frame")}
    assert "image" in kinds["image"] and "tensor" in kinds["frame"]
    assert set(content["multipart/form-data"]["schema"]["properties"]) == {
        "request", "image", "frame"}


@pytest.mark.timeout(180)
def test_media_and_tensors_through_the_served_processes(tmp_path):
    """The API server fetches and attaches, a data-worker process decodes: the same
    outputs as the plain nested lists on the same server."""
    server = Server(tmp_path, "--config", "testvla_single", "--preset", "tiny",
                    "--load-format", "dummy")
    try:
        server.wait_healthy()
        url = server.url + "/generate"
        start = torch.tensor(frame(25))
        want = outputs(httpx.post(url, json={**ROLL, "frame": start.tolist()}, timeout=60),
                       "frame")
        got = outputs(httpx.post(url, data={"request": json.dumps(ROLL)}, timeout=60,
                                 files={"frame": ("f.npy", npy(start))}), "frame")
        assert all(torch.equal(a, b) for a, b in zip(got, want)) and len(got) == 2
        by_upload = outputs(httpx.post(url, data={"request": json.dumps(
            {**ACT, "image": "upload://cat.png"})}, files={"f": ("cat.png", CAT)},
            timeout=60), "actions")
        inline = outputs(httpx.post(url, json={**ACT, "image": data_url(CAT)}, timeout=60),
                         "actions")
        assert torch.equal(by_upload[0], inline[0])
        assert_error(httpx.post(url, json={**ACT, "image": data_url(b"no", "text/plain")},
                                timeout=60), 400, "image", "not an image")
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()
