"""The media and tensor field types of the model contract (`mstar.model.fields`): what a
schema declares is found through unions, each kind decodes to its object (audio at the
declared rate, video at the declared frame rate, tensors from JSON, .safetensors and .npy),
and plain form fields are coerced to the schema's types."""

from __future__ import annotations

import base64
import io
from typing import Annotated, Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel
from safetensors.torch import save
from test_media import _peak_hz, _sine, _video, _video_with_sound, _wav

from mstar.api_server.forms import form_values
from mstar.api_server.request_flow import ApiError
from mstar.api_server.schemas import field_types
from mstar.errors import RequestError
from mstar.media import Audio, MediaLimits, Video
from mstar.model import ImageInput, InputField, TensorInput
from mstar.model.fields import decode_inputs, input_fields


class Request(BaseModel):
    prompt: str = ""
    max_tokens: int = 16
    image: list[float] | ImageInput | None = None
    speech: Annotated[Any, InputField("audio", sample_rate=16000)] | None = None
    clip: Annotated[Any, InputField("video", fps=5.0, max_frames=16)] | None = None
    film: Annotated[Any, InputField("video", sample_rate=16000)] | None = None
    latents: TensorInput | None = None
    cameras: dict[str, ImageInput] | list[ImageInput] | None = None
    clips: list[Annotated[Any, InputField("audio", sample_rate=8000)]] = []


FIELDS = input_fields(Request)


def decode(**request: Any) -> dict[str, Any]:
    blobs = request.pop("blobs", ())
    return decode_inputs(request, FIELDS, blobs, MediaLimits())


def test_the_schema_declares_its_fields_through_unions():
    assert {name: f.kind for name, f in FIELDS.items()} == {
        "image": "image", "speech": "audio", "clip": "video", "film": "video",
        "latents": "tensor", "cameras": "image", "clips": "audio"}
    assert FIELDS["speech"].sample_rate == 16000
    assert {name: (sorted(f.containers), f.single) for name, f in FIELDS.items()
            if f.containers or not f.single} == {"cameras": (["dict", "list"], False),
                                                 "clips": (["list"], False)}
    assert FIELDS["clips"].sample_rate == 8000  # the item's marker, as a lone field's


def test_each_item_of_a_container_decodes_and_an_error_names_it():
    red = np.zeros((2, 5, 3), np.uint8)
    red[..., 0] = 255
    png = io.BytesIO()
    Image.fromarray(red).save(png, format="PNG")
    wav = _wav(_sine(440, 0.1, 16000), 16000)
    got = decode(cameras={"front": red, "wrist": {"blob": 0}}, clips=[{"blob": 1}],
                 blobs=[png.getvalue(), wav])
    front, wrist = got["cameras"]["front"], got["cameras"]["wrist"]
    assert front.mode == "RGB" and front.size == (5, 2) and front.getpixel((0, 0)) == (
        255, 0, 0)
    assert np.array_equal(np.asarray(wrist), red)
    assert [a.sample_rate for a in got["clips"]] == [8000]
    as_list = decode(cameras=[torch.from_numpy(red).permute(2, 0, 1).float() / 255])
    assert np.array_equal(np.asarray(as_list["cameras"][0]), red)
    for given, param, words in (
            ({"cameras": {"front": red, "wrist": red[..., :2]}}, "cameras.wrist",
             "got shape [2, 5, 2]"),
            ({"cameras": [red, red.astype(np.int64)]}, "cameras[1]", "got int64"),
            ({"cameras": [red.astype(np.float32) * 2]}, "cameras[0]", "in [0, 1]"),
            ({"cameras": [red] * 65}, "cameras", "holds 65 items; at most 64")):
        with pytest.raises(RequestError, match=words.replace("[", r"\[")) as err:
            decode(**given)
        assert err.value.param == param and err.value.code == 400


def test_audio_is_resampled_to_the_declared_rate():
    wav = _wav(_sine(440, 0.5, 8000), 8000)
    data_url = "data:audio/wav;base64," + base64.b64encode(wav).decode()
    for given in ({"speech": data_url}, {"speech": {"blob": 0}, "blobs": [wav]}):
        audio = decode(**given)["speech"]
        assert isinstance(audio, Audio) and audio.sample_rate == 16000
        assert len(audio.samples) == 8000 and abs(_peak_hz(audio.samples, 16000) - 440) < 5


def test_video_is_sampled_at_the_declared_rate():
    video = decode(clip={"blob": 0}, blobs=[_video(seconds=2, rate=10)])["clip"]
    assert isinstance(video, Video) and video.fps == 5.0 and video.frames.shape[0] == 10
    assert video.timestamps == pytest.approx([0.2 * k for k in range(10)])


def test_a_video_field_with_a_sample_rate_gets_its_sound():
    data = _video_with_sound(frequency=1000.0)
    film = decode(film={"blob": 0}, blobs=[data])["film"]
    assert film.audio is not None and film.audio.sample_rate == 16000
    assert abs(_peak_hz(film.audio.samples, 16000) - 1000) <= 1
    assert decode(clip={"blob": 0}, blobs=[data])["clip"].audio is None


def test_tensors_from_json_safetensors_and_npy():
    t = torch.arange(6, dtype=torch.int32).reshape(2, 3)
    as_json = {"dtype": "int32", "shape": [2, 3], "data": base64.b64encode(
        t.numpy().tobytes()).decode()}
    npy = io.BytesIO()
    np.save(npy, t.numpy())
    for given in ({"latents": as_json},
                  {"latents": {"blob": 0}, "blobs": [save({"latents": t, "other": t * 2})]},
                  {"latents": {"blob": 0}, "blobs": [save({"anything": t})]},
                  {"latents": {"blob": 0}, "blobs": [npy.getvalue()]},
                  {"latents": t.numpy()}):
        assert torch.equal(decode(**given)["latents"], t)


@pytest.mark.parametrize("blob, words", [
    (save({"a": torch.zeros(1), "b": torch.zeros(1)}), "one tensor, or one named"),
    (b"\x93NUMPY" + b"junk", "could not be read"),
    (b"plain bytes", ".npy or a .safetensors"),
])
def test_bad_tensor_files_name_the_field(blob: bytes, words: str):
    with pytest.raises(RequestError, match=words) as err:
        decode(latents={"blob": 0}, blobs=[blob])
    assert err.value.param == "latents" and err.value.code == 400


UNPICKLED: list[str] = []


def mark(what: str) -> None:
    UNPICKLED.append(what)


class Tripwire:
    """Unpickling it leaves a mark."""

    def __reduce__(self):
        return mark, ("unpickled",)


def test_an_object_array_is_never_unpickled():
    npy = io.BytesIO()
    np.save(npy, np.array([Tripwire()], dtype=object), allow_pickle=True)
    with pytest.raises(RequestError, match="could not be read"):
        decode(latents={"blob": 0}, blobs=[npy.getvalue()])
    assert UNPICKLED == []


def test_other_forms_of_a_field_pass_unchanged():
    assert decode(image=[0.5, 0.25])["image"] == [0.5, 0.25]
    with pytest.raises(RequestError, match="no blob 1") as err:
        decode(image={"blob": 1}, blobs=[b""])
    assert err.value.param == "image"


def test_plain_form_fields_are_coerced_to_the_schema_types():
    plain = {"prompt": ["8"], "max_tokens": ["8"], "stop[]": ["a", "b"], "n": ["x y"]}
    assert form_values(plain, field_types(Request)) == {
        "prompt": "8", "max_tokens": 8, "stop": ["a", "b"], "n": "x y"}
    deep = "[" * 100 + "]" * 100
    assert form_values({"prompt": [deep]}, field_types(Request)) == {"prompt": deep}
    with pytest.raises(ApiError) as err:
        form_values({"max_tokens": [deep]}, field_types(Request))
    assert err.value.code == "json_too_deep" and err.value.param == "max_tokens"
