"""The body of a native `/generate` call: the model's fields with arrays and media encoded
as the server reads them.

A numpy array or torch tensor becomes the tensor JSON `{"dtype", "shape", "data"}`; a PIL
image, a file (`pathlib.Path`) or bytes becomes a `data:` URL typed by its content (a str
is sent as given: text, or an http(s)/`data:` URL). A top-level field whose encoded bytes
are over `inline_limit` travels instead as a file part of a `multipart/form-data` body
named by the field (`.npy` for an array, `.safetensors` for a torch tensor, the file itself
for media) beside a `request` part holding the rest as JSON; so does a `.npy` or
`.safetensors` file or bytes, whatever its size. The items of a field's list or dict (e.g.
cameras by name) are encoded the same way, a file part named `<field>.<key>` /
`<field>.<i>` (the list keeps a null in its place); deeper down, always inline.
"""

from __future__ import annotations

import json
import mimetypes
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mstar.client import _tensors as tensors
from mstar.client._media import data_url, media_bytes

#: Fields whose encoded bytes are above this go as file parts (1 MiB).
INLINE_LIMIT = 1 << 20
SAFETENSORS = "application/vnd.safetensors"
#: What an item that travels as a file part leaves in the JSON body (nothing; a list: null).
_PART = object()


@dataclass(frozen=True)
class Payload:
    """A request body: JSON, or multipart (`request` JSON plus `files`; with `form`, the
    body's fields as plain form fields instead, as OpenAI's forms are), and its headers."""

    body: dict[str, Any]
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    form: bool = False

    def http_args(self) -> dict[str, Any]:
        """The keyword arguments of `httpx.Client.build_request` for this body."""
        if not self.files:
            return {"json": self.body, "headers": self.headers}
        if self.form:  # a string as itself, anything else as JSON (the server reads both)
            data = {name: value if isinstance(value, str) else json.dumps(value)
                    for name, value in self.body.items()}
            return {"data": data, "files": self.files, "headers": self.headers}
        return {"data": {"request": json.dumps(self.body)}, "files": self.files,
                "headers": self.headers}


def _is_tensor_file(data: bytes) -> bool:
    """An npy file, or a safetensors one (a little-endian header size, then a JSON object)."""
    if data.startswith(tensors.NPY_MAGIC):
        return True
    if len(data) < 10 or data[8:10] != b'{"':
        return False
    return int.from_bytes(data[:8], "little") <= len(data) - 8


def _inline(value: Any) -> Any:
    """`value` as JSON, arrays and media inlined (recursing into lists and dicts)."""
    if tensors.is_tensor(value):
        return tensors.to_json(value)
    media = media_bytes(value)
    if media is not None:
        return data_url(*media)
    if isinstance(value, list | tuple):
        return [_inline(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _inline(v) for k, v in value.items()}
    return value


def _file_part(name: str, value: Any, inline_limit: int) -> tuple[str, bytes, str] | None:
    """(file name, content, type) when the field must travel as a file part, else None."""
    if tensors.is_tensor(value):
        if value.nbytes <= inline_limit:  # type: ignore[attr-defined]
            return None
        filename, content = tensors.tensor_file(name, value)
        return filename, content, "application/octet-stream"
    media = media_bytes(value)
    if media is None:
        return None
    data, mime = media
    if _is_tensor_file(data):
        suffix = ".npy" if data.startswith(tensors.NPY_MAGIC) else ".safetensors"
        return f"{name}{suffix}", data, "application/octet-stream"
    if len(data) <= inline_limit:
        return None
    subtype = mime.rsplit("/", 1)[-1].removeprefix("x-")
    return f"{name}{mimetypes.guess_extension(mime) or '.' + subtype}", data, mime


def generate_payload(request: Mapping[str, Any] | None, fields: Mapping[str, Any], *,
                     stream: bool, binary: bool = False,
                     inline_limit: int = INLINE_LIMIT) -> Payload:
    """The body of a `/generate` call: the model's request (a dict, keyword fields, or both;
    the fields win) plus `stream`; `binary` asks for the safetensors answer."""
    merged = {**(request or {}), **fields}
    body: dict[str, Any] = {}
    files: list[tuple[str, tuple[str, bytes, str]]] = []

    def encoded(name: str, value: Any) -> Any:
        """`value` inline, or `_PART` once it is a file part named `name`."""
        part = _file_part(name, value, inline_limit)
        if part is None:
            return _inline(value)
        files.append((name, part))
        return _PART

    for name, value in merged.items():
        if isinstance(value, Mapping):
            items = {key: encoded(f"{name}.{key}", v) for key, v in value.items()}
            body[name] = {key: v for key, v in items.items() if v is not _PART}
        elif isinstance(value, list | tuple):
            body[name] = [None if v is _PART else v for v in
                          (encoded(f"{name}.{i}", v) for i, v in enumerate(value))]
        elif (inline := encoded(name, value)) is not _PART:
            body[name] = inline
    body["stream"] = stream
    headers = {"Accept": SAFETENSORS} if binary and not stream else {}
    return Payload(body, files, headers)
