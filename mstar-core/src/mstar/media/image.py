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


def image_from_array(pixels: np.ndarray, limits: MediaLimits | None = None) -> Image.Image:
    """An RGB image from an array, so a model sees one type however a client sent its
    camera frames: uint8 [H, W, 3], [H, W] (gray), [H, W, 4] (RGBA: alpha dropped) or
    [3, H, W] (read so only when the last axis is not 3 or 4); floats in [0, 1] are
    rounded to uint8. 400 for another dtype, shape or range; 413 over
    `max_image_pixels`."""
    if pixels.ndim == 3 and pixels.shape[-1] not in (3, 4) and pixels.shape[0] == 3:
        pixels = pixels.transpose(1, 2, 0)
    if not (pixels.ndim == 2 or pixels.ndim == 3 and pixels.shape[-1] in (3, 4)) \
            or 0 in pixels.shape:
        raise MediaError(f"an image array is [H, W, 3], [H, W], [H, W, 4] or [3, H, W], got "
                         f"shape {list(pixels.shape)}")
    height, width = pixels.shape[:2]
    if limits is not None and width * height > limits.max_image_pixels:
        raise too_large(f"the image ({width}x{height} pixels)", limits.max_image_pixels,
                        "pixels")
    if pixels.dtype.kind == "f":
        if not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
            raise MediaError("a float image array holds values in [0, 1]")
        pixels = (pixels.astype(np.float32) * 255.0).round().astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise MediaError(f"an image array is uint8 or float in [0, 1], got {pixels.dtype}")
    mode = "L" if pixels.ndim == 2 else "RGB" if pixels.shape[-1] == 3 else "RGBA"
    return Image.fromarray(np.ascontiguousarray(pixels), mode).convert("RGB")


def png_bytes(pixels: Any) -> bytes:
    """uint8 RGB pixels [H, W, 3] (a numpy array or a CPU tensor) as PNG bytes."""
    out = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB").save(out, format="PNG")
    return out.getvalue()
