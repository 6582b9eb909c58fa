"""Media as the SDK sends them: images as the URLs an OpenAI `image_url` content part
carries, and any media field of `/generate` (image, audio, video) as bytes with their type.

Remote URLs and `data:` URLs pass through (the server fetches or decodes them); local files,
raw bytes and PIL images are inlined as `data:` URLs, typed by their content (magic bytes)
because the server trusts the bytes, not a file name. PIL is never imported here: an image
object only needs a `save(fp, format=...)` method.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import os
import sys

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))
#: Audio and video containers by their first bytes (offset, magic, type).
_AV_MAGIC = ((0, b"fLaC", "audio/flac"), (0, b"OggS", "audio/ogg"), (0, b"ID3", "audio/mpeg"),
             (0, b"\xff\xfb", "audio/mpeg"), (0, b"\xff\xf3", "audio/mpeg"),
             (8, b"WAVE", "audio/wav"), (8, b"AVI ", "video/x-msvideo"),
             (4, b"ftyp", "video/mp4"), (0, b"\x1a\x45\xdf\xa3", "video/webm"))
_URL_SCHEMES = ("http://", "https://", "data:")


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes, from their first bytes; None if unknown."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def sniff_media_type(data: bytes) -> str | None:
    """The MIME type of an encoded image, audio or video file; None if unknown."""
    for offset, magic, mime in _AV_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return mime
    return sniff_image_type(data)


def media_bytes(media: object) -> tuple[bytes, str] | None:
    """(bytes, MIME type) of a local media item: a path (`os.PathLike`; a str is text, not
    a file), bytes, or a PIL image (as PNG); None for anything else. Unknown content is
    `application/octet-stream` (the server decides what it is)."""
    if isinstance(media, os.PathLike):
        with open(media, "rb") as f:
            data = f.read()
        return data, (sniff_media_type(data) or mimetypes.guess_type(os.fspath(media))[0]
                      or "application/octet-stream")
    if isinstance(media, bytes | bytearray | memoryview):
        data = bytes(media)
        return data, sniff_media_type(data) or "application/octet-stream"
    image = sys.modules.get("PIL.Image")
    if image is not None and isinstance(media, image.Image):
        buf = io.BytesIO()
        media.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    return None


def image_file(image: object) -> tuple[bytes, str]:
    """(bytes, MIME type) of one image to upload: a path (str or `os.PathLike`), encoded
    bytes, a PIL image, or an array [H, W] / [H, W, 3 or 4] (numpy or torch; uint8, or
    floats in [0, 1]), the last two as PNG."""
    if isinstance(image, str):
        image = os.fspath(image)
        with open(image, "rb") as f:
            data = f.read()
        return data, sniff_image_type(data) or "application/octet-stream"
    found = media_bytes(image)
    if found is not None:
        return found
    if hasattr(image, "__array__"):
        import numpy as np
        from PIL import Image

        detach = getattr(image, "detach", None)
        array = np.asarray(detach().cpu() if callable(detach) else image)
        if array.dtype != np.uint8:
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise TypeError(f"an image must be a path, bytes, a PIL image or an array, not "
                    f"{type(image).__name__}")


def data_url(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def image_url(image: object) -> str:
    """The URL for one image: a URL as given, anything else inlined as a `data:` URL."""
    if isinstance(image, str) and image.startswith(_URL_SCHEMES):
        return image
    if isinstance(image, str | os.PathLike):
        with open(image, "rb") as f:
            data = f.read()
        mime = sniff_image_type(data) or mimetypes.guess_type(os.fspath(image))[0]
        if mime is None or not mime.startswith("image/"):
            raise ValueError(f"{os.fspath(image)!r} is not an image file of a known type")
        return data_url(data, mime)
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        mime = sniff_image_type(data)
        if mime is None:
            raise ValueError("image bytes are not PNG, JPEG, GIF, WebP or BMP")
        return data_url(data, mime)
    save = getattr(image, "save", None)
    if callable(save):  # a PIL image: sent losslessly as PNG
        buf = io.BytesIO()
        save(buf, format="PNG")
        return data_url(buf.getvalue(), "image/png")
    raise TypeError(f"an image must be a path, a URL, bytes or a PIL image, not "
                    f"{type(image).__name__}")
