"""BAGEL's contract in process (tiny preset, dummy weights): each task yields its kind of
output, think mode reasons before the image, and bad requests are refused naming the field."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import mstar
from mstar import events


@pytest.fixture(scope="module")
def bagel():
    with mstar.load("bagel", preset="tiny", load_format="dummy") as dep:
        yield dep


def _run(dep, **req) -> list[events.Event]:
    return list(dep.generate({"prompt": "a cat in a hat", "seed": 1, "num_timesteps": 3,
                              **req}))


def _images(evs: list[events.Event]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(e.data)) for e in evs if isinstance(e, events.Image)]


def test_understanding_answers_in_text(bagel) -> None:
    photo = Image.new("RGB", (40, 30), (200, 10, 10))
    evs = _run(bagel, mode="text", image=photo, max_tokens=5)
    deltas = [e for e in evs if isinstance(e, events.TextDelta)]
    assert sum(len(d.token_ids) for d in deltas) == 5
    assert isinstance(evs[-1], events.Finished) and evs[-1].reason == "length"


@pytest.mark.parametrize(("size", "want"), [(None, (32, 32)), ((48, 32), (48, 32))])
def test_generation_gives_a_png_of_the_size(bagel, size, want) -> None:
    extra = {} if size is None else {"width": size[0], "height": size[1]}
    (image,) = _images(_run(bagel, mode="image", **extra))
    assert image.format == "PNG" and image.size == want and image.mode == "RGB"


def test_an_edit_keeps_the_input_size_and_n_images_differ(bagel) -> None:
    photo = Image.new("RGB", (40, 30), (10, 200, 10))
    images = _images(_run(bagel, mode="image", image=photo, n=2))
    assert [im.size for im in images] == [(40, 32), (40, 32)]  # the VAE rule's resize
    assert images[0].tobytes() != images[1].tobytes()


def test_think_reasons_then_draws(bagel) -> None:
    evs = _run(bagel, mode="image", think=True, max_tokens=4)
    kinds = [type(e).__name__ for e in evs]
    assert kinds == ["TextDelta"] * 4 + ["Image", "Finished"]


@pytest.mark.parametrize(("req", "param", "words"), [
    ({"mode": "image", "width": 64, "height": 64}, "width",
     "size: 64x64 is not supported; sizes: 32x32, 48x32, 32x48"),
    ({"mode": "image", "n": 5}, "n", "n: at most 4"),
    ({"mode": "image", "cfg_interval": [0.8, 0.2]}, "cfg_interval", "0 <= lo <= hi <= 1"),
    ({"mode": "image", "cfg_text_scale": 0.5}, "cfg_text_scale", "greater than or equal"),
    ({"mode": "image", "num_timesteps": 1}, "num_timesteps", "greater than or equal"),
    ({"mode": "image", "think": True, "n": 2}, "n", "a think request makes one image"),
    ({"mode": "text", "width": 32}, "width", "width and height are for mode 'image'"),
])
def test_bad_requests_name_the_field(bagel, req, param, words) -> None:
    with pytest.raises(mstar.RequestError, match=words) as err:
        _run(bagel, **req)
    assert err.value.param == param
