"""Images as the URLs an OpenAI `image_url` content part carries.

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

_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
          (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"), (b"BM", "image/bmp"))
_URL_SCHEMES = ("http://", "https://", "data:")


def sniff_image_type(data: bytes) -> str | None:
    """The MIME type of encoded image bytes, from their first bytes; None if unknown."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


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
