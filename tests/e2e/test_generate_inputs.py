"""Media and tensor fields of `/generate` (testvla's `image`, `cameras` (a dict or list of
images) and `frame`), in every form a client may send them: JSON (data URL, http URL,
tensor JSON, an image's pixels as a tensor), multipart/form-data with a `request` part and
file parts (named after the field or a container's item, or referred to as upload://),
plain OpenAI-style form fields, and in-process objects. Each form gives what the plain nested
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


def pixels(png_bytes: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png_bytes)).convert("RGB"))


def test_a_container_field_takes_each_item_in_every_form(dep, client, media_url):  # noqa: F811
    """`cameras` by name or as a list; each item a data URL, an http URL, an upload, a
    file part named `cameras.<key>` / `cameras.<i>`, or pixels as a tensor."""
    cat, dog = Image.open(io.BytesIO(CAT)), Image.open(io.BytesIO(DOG))
    want = in_process(dep, {**ACT, "cameras": {"left": cat, "right": dog}}, "actions")
    swapped = in_process(dep, {**ACT, "cameras": [dog, cat]}, "actions")
    assert want and not torch.equal(want[0], swapped[0])  # each item, in its order, decides
    Media.hits.clear()
    answers = {
        "data URLs": client.post("/generate", json={**ACT, "cameras": {
            "left": data_url(CAT), "right": data_url(DOG)}}),
        "a list, one http URL": client.post("/generate", json={**ACT, "cameras": [
            media_url + "/cat.png", data_url(DOG)]}),
        "parts by key": multipart(client, ACT, {"cameras.left": ("l.png", CAT),
                                                "cameras.right": ("r.png", DOG)}),
        "parts by index": multipart(client, {**ACT, "cameras": [None, data_url(DOG)]},
                                    {"cameras.0": ("l.png", CAT)}),
        "upload://": multipart(client, {**ACT, "cameras": {"left": "upload://l.png",
                                                           "right": "upload://r.png"}},
                               {"a": ("l.png", CAT), "b": ("r.png", DOG)}),
        "tensors": multipart(client, {**ACT, "cameras": {"left": tensor_json(
            torch.from_numpy(pixels(CAT)))}}, {"cameras.right": (
                "r.npy", npy(torch.from_numpy(pixels(DOG)).permute(2, 0, 1) / 255.0))}),
    }
    assert Media.hits == ["/cat.png"]
    for form, response in answers.items():
        got = outputs(response, "actions")
        assert len(got) == 1 and torch.equal(got[0], want[0]), form


def test_an_image_field_takes_pixels_as_a_tensor(dep, client):
    want = in_process(dep, {**ACT, "image": Image.open(io.BytesIO(CAT))}, "actions")
    rgb = torch.from_numpy(pixels(CAT))  # uint8 [H, W, 3]
    rgba = torch.cat([rgb, torch.full_like(rgb[..., :1], 7)], dim=-1)
    answers = {
        "uint8 HWC JSON": client.post("/generate", json={**ACT, "image": tensor_json(rgb)}),
        "float CHW JSON": client.post("/generate", json={**ACT, "image": tensor_json(
            rgb.permute(2, 0, 1).float() / 255.0)}),
        "RGBA .npy part": multipart(client, ACT, {"image": ("i.npy", npy(rgba))}),
        "safetensors part": multipart(client, ACT, {"image": ("i.safetensors",
                                                              save({"image": rgb}))}),
    }
    for form, response in answers.items():
        got = outputs(response, "actions")
        assert len(got) == 1 and torch.equal(got[0], want[0]), form
    for value in (rgb, rgb.numpy(), rgb.numpy() / 255.0):
        assert torch.equal(in_process(dep, {**ACT, "image": value}, "actions")[0], want[0])
    gray = in_process(dep, {**ACT, "image": rgb[..., 0].numpy()}, "actions")
    assert torch.equal(gray[0], in_process(dep, {**ACT, "image": Image.fromarray(
        rgb[..., 0].numpy()).convert("RGB")}, "actions")[0])


def test_bad_arrays_and_container_items_are_refused_naming_the_item(client):
    rgb = torch.zeros(4, 4, 3, dtype=torch.uint8)
    for bad, words in ((torch.zeros(4, 4, 7, dtype=torch.uint8), "got shape [4, 4, 7]"),
                       (torch.zeros(4, 0, 3, dtype=torch.uint8), "got shape [4, 0, 3]"),
                       (rgb.long(), "uint8 or float in [0, 1], got int64"),
                       (rgb.float() + 1.5, "values in [0, 1]")):
        assert_error(client.post("/generate", json={**ACT, "image": tensor_json(bad)}), 400,
                     "image", words)
    assert_error(multipart(client, ACT, {"image": ("i.npy", npy(rgb.long()))}), 400,
                 "image", "got int64")
    assert_error(client.post("/generate", json={**ACT, "cameras": {
        "left": data_url(CAT), "right": data_url(b"no", "text/plain")}}), 400,
        "cameras.right", "not an image")
    assert_error(multipart(client, {**ACT, "cameras": [data_url(CAT)]},
                           {"cameras.1": ("x.npy", npy(rgb.long()))}), 400, "cameras[1]",
                 "got int64")
    assert_error(client.post("/generate", json={**ACT, "cameras": [data_url(CAT)] * 65}), 400,
                 "cameras", "holds 65 items; at most 64")
    assert_error(multipart(client, {**ACT, "cameras": {"left": data_url(CAT)}},
                           {"cameras.left": ("l.png", CAT)}), 400, "cameras.left",
                 "given twice")
    assert_error(multipart(client, {**ACT, "cameras": [data_url(CAT)]},
                           {"cameras.left": ("l.png", CAT)}), 400, "cameras",
                 "named cameras.<index>")
    assert_error(multipart(client, ACT, {"cameras.left": ("l.png", CAT),
                                         "frame.x": ("f.npy", npy(rgb))}), 400, "frame.x",
                 "fills no field")


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
        "request", "image", "cameras", "frame"}
    cameras = [s for s in fields["cameras"]["anyOf"] if s.get("type") in ("object", "array")]
    assert [s.get("additionalProperties", s.get("items"))["x-mstar"] for s in cameras] == [
        "image", "image"]


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
