"""Decoding a request's image bytes into an RGB Pillow image, safely; and a model's
pixels encoded as the PNG of an `events.Image`.

Pillow reads only the header on `open`, so the pixel limit is checked there, before any
pixel is decoded: a small PNG that declares 100k x 100k pixels (a decompression bomb) costs
nothing. Only common raster formats are accepted: Pillow can also open formats that hand the
bytes to outside programs (EPS runs Ghostscript), which a server must never do for a client.
The result is `convert("RGB")` (alpha dropped, palette expanded, first frame of an animation),
the same conversion the Hugging Face image processors apply, so our inputs match theirs.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mstar.media.limits import MediaError, MediaLimits, too_large

#: Formats a client may send (the JPEG opener also reads the multi-picture MPO files many
#: phone cameras write).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


def load_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """An RGB image from encoded bytes: 400 for anything that is not an image in
    `IMAGE_FORMATS`, 413 over `max_image_pixels` (decided from the header)."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own (global) bomb guard fired on the header before ours could.
        raise too_large("the image", limits.max_image_pixels, "pixels") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise MediaError("the media is not an image Pillow can read (accepted: "
                         f"{', '.join(IMAGE_FORMATS)})") from None
    with image:
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise too_large(f"the image ({width}x{height} pixels)", limits.max_image_pixels,
                            "pixels")
        try:
            return image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as exc:
            raise MediaError(f"the image could not be decoded: {exc}") from None


def png_bytes(pixels: Any) -> bytes:
    """uint8 RGB pixels [H, W, 3] (a numpy array or a CPU tensor) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()
