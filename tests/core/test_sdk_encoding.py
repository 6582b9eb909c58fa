"""What the SDK sends to `/generate` and how it reads tensors back, checked at the encoding
level (the server's parsing of tensor and media inputs is tested on its side): the request
`generate()` builds is decoded by independent readers (msgspec into `mstar.events.TensorData`,
the stdlib's MIME parser for multipart bodies, numpy, the safetensors package, Pillow) and
compared with what was given."""

from __future__ import annotations

import base64
import email
import email.policy
import io
import json

import httpx
import msgspec
import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mstar import events
from mstar.client import _tensors
from mstar.client._payload import INLINE_LIMIT, generate_payload


def sent(payload) -> httpx.Request:
    """The HTTP request the client builds for a payload."""
    request = httpx.Request("POST", "http://server/generate", **payload.http_args())
    request.read()
    return request


def parts(request: httpx.Request) -> dict[str, tuple[str | None, str, bytes]]:
    """The multipart body's parts by name: (file name, content type, bytes)."""
    kind = request.headers["content-type"]
    assert kind.startswith("multipart/form-data")
    message = email.message_from_bytes(b"Content-Type: " + kind.encode() + b"\r\n\r\n" +
                                       request.content, policy=email.policy.HTTP)
    out = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = (part.get_filename(), part.get_content_type(),
                     part.get_payload(decode=True))
    return out


def as_torch(value: dict) -> torch.Tensor:
    """A tensor JSON read as the server reads it (msgspec into `TensorData`)."""
    return msgspec.json.decode(json.dumps(value), type=events.TensorData).to_tensor()


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def wav(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate,
                    format="WAV", subtype="PCM_16")
    return buf.getvalue()


PIXELS = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


def test_small_arrays_and_tensors_are_the_tensor_json_the_server_reads():
    given = {"f32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
             "i64": np.arange(5, dtype=np.int64), "flags": np.array([True, False, True]),
             "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
             "scalar": np.array(2.5)}
    bf16 = torch.linspace(-2, 2, 8, dtype=torch.bfloat16).reshape(2, 4)
    request = sent(generate_payload({"prompt": "x", **given}, {"bf16": bf16}, stream=False))
    body = json.loads(request.content)
    assert body["prompt"] == "x" and body["stream"] is False
    for name, value in given.items():
        assert torch.equal(as_torch(body[name]), torch.from_numpy(value.astype(
            value.dtype.newbyteorder("=")))), name
    assert body["bf16"]["dtype"] == "bfloat16" and torch.equal(as_torch(body["bf16"]), bf16)
    with pytest.raises(ValueError, match="dtype object"):
        generate_payload(None, {"x": np.array([{}, None])}, stream=False)


def test_media_are_data_urls_typed_by_their_content(tmp_path):
    audio = tmp_path / "clip.bin"  # the name says nothing: the content is WAV
    audio.write_bytes(wav(0.1))
    image = Image.fromarray(PIXELS)
    body = json.loads(sent(generate_payload(None, {
        "image": image, "audio": audio, "jpeg": b"\xff\xd8\xff" + b"\0" * 10,
        "url": "https://example.com/a.png", "images": [image, "data:image/png;base64,AA=="],
        "nested": {"frame": np.zeros(2, np.float32)}}, stream=True)).content)
    head, _, data = body["image"].partition(",")
    assert head == "data:image/png;base64"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(data)))),
                                  PIXELS)
    assert body["audio"] == "data:audio/wav;base64," + base64.b64encode(
        audio.read_bytes()).decode()
    assert body["jpeg"].startswith("data:image/jpeg;base64,")
    assert body["url"] == "https://example.com/a.png" and body["stream"] is True
    assert body["images"][0] == body["image"] and body["images"][1].endswith("AA==")
    assert as_torch(body["nested"]["frame"]).tolist() == [0.0, 0.0]


def test_large_fields_are_file_parts_named_by_the_field(tmp_path):
    big = np.random.default_rng(0).standard_normal((600, 600)).astype(np.float32)
    latents = torch.randn(700, 800).to(torch.bfloat16)
    clip = wav(40.0)  # 1.28 MB of PCM
    small = tmp_path / "state.npy"
    np.save(small, np.arange(3, dtype=np.int32))
    assert big.nbytes > INLINE_LIMIT and len(clip) > INLINE_LIMIT
    request = sent(generate_payload({"prompt": "go", "frame": big}, {
        "latents": latents, "audio": clip, "state": small, "image": PIXELS}, stream=False,
        binary=True))
    got = parts(request)
    assert set(got) == {"request", "frame", "latents", "audio", "state"}
    body = json.loads(got["request"][2])
    assert body["prompt"] == "go" and body["stream"] is False
    assert torch.equal(as_torch(body["image"]), torch.from_numpy(PIXELS))
    assert not {"frame", "latents", "audio", "state"} & set(body)
    name, _, content = got["frame"]
    assert name == "frame.npy"
    np.testing.assert_array_equal(np.load(io.BytesIO(content), allow_pickle=False), big)
    name, _, content = got["latents"]
    assert name == "latents.safetensors"
    assert torch.equal(load_safetensors(content)["latents"], latents)
    assert got["audio"] == ("audio.wav", "audio/wav", clip)
    assert got["state"][0] == "state.npy" and got["state"][2] == small.read_bytes()
    assert request.headers["accept"] == "application/vnd.safetensors"


def test_tensors_read_back_from_json_and_safetensors_as_numpy():
    source = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(4).half(),
              "i64": torch.arange(-3, 3), "flags": torch.tensor([[True], [False]]),
              "u8": torch.arange(6, dtype=torch.uint8).reshape(2, 3)}
    arrays, metadata = _tensors.read_safetensors(save_safetensors(source, {"id": "r"}))
    assert metadata == {"id": "r"} and arrays.keys() == source.keys()
    for name, tensor in source.items():
        expected = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        assert torch.equal(torch.from_numpy(arrays[name]), expected), name
        wire = msgspec.to_builtins(events.TensorData.from_tensor(tensor))
        assert torch.equal(torch.from_numpy(_tensors.from_json(wire)), expected), name
    written = _tensors.write_safetensors({n: _tensors.wire_tensor(t) for n, t in source.items()})
    for name, tensor in load_safetensors(written).items():
        assert torch.equal(tensor, source[name]), name


def test_the_items_of_a_dict_or_list_field_are_encoded_one_by_one():
    """Cameras by name or as a list: small items inline (an array as a tensor, never a PNG),
    large ones file parts named `<field>.<key>` / `<field>.<i>` (a list keeps a null)."""
    big = np.random.default_rng(1).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    assert big.nbytes > INLINE_LIMIT
    request = sent(generate_payload({"prompt": "pick"}, {
        "images": {"base": PIXELS, "wrist": big, "side": Image.fromarray(PIXELS)},
        "cams": [big, PIXELS], "state": [0.5, -1.0]}, stream=False))
    got = parts(request)
    assert set(got) == {"request", "images.wrist", "cams.0"}
    body = json.loads(got["request"][2])
    assert set(body["images"]) == {"base", "side"}
    assert torch.equal(as_torch(body["images"]["base"]), torch.from_numpy(PIXELS))
    assert body["images"]["side"].startswith("data:image/png;base64,")
    assert body["cams"][0] is None and torch.equal(as_torch(body["cams"][1]),
                                                   torch.from_numpy(PIXELS))
    assert body["state"] == [0.5, -1.0]
    for name in ("images.wrist", "cams.0"):
        filename, _, content = got[name]
        assert filename == f"{name}.npy"
        np.testing.assert_array_equal(np.load(io.BytesIO(content), allow_pickle=False), big)
