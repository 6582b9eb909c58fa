"""Media and tensor fields of a model's `/generate` request, declared in its pydantic schema.

A model marks a field `ImageInput`, `AudioInput`, `VideoInput` or `TensorInput` (or
`Annotated[Any, InputField("audio", sample_rate=16000)]` for a rate of its own), so that
core, not the model, turns what the client sent into objects: the API server fetches a
media field (http(s) or data URL, `upload://<file name>`) or takes a multipart file part
named after the field, and the data worker decodes it here before `process_prompt` runs
(an image -> `PIL.Image.Image`, audio -> `mstar.media.Audio` at the declared rate, a video ->
`mstar.media.Video`, a tensor -> `torch.Tensor`). The marker also validates the JSON form
(a 400 naming the field) and tags the field in the JSON schema (`"x-mstar": kind`), so the
OpenAPI document says which fields take media or tensors.

A tensor in JSON is `{"dtype", "shape", "data": base64 of the C-order bytes}` (the shape
`mstar.events.TensorData` has), or a `.safetensors` / `.npy` file part. An image may be
given as such a tensor too (or, in-process, a numpy array or torch tensor): uint8 or float
pixels in [0, 1], decoded to the same RGB image (`mstar.media.image_from_array`).

A field may also be a container of media: `dict[str, ImageInput]` (e.g. cameras by name)
or `list[ImageInput]`, of any kind; each item is fetched and decoded as a lone field would
be, and an error names the item (`images.wrist`, `images[1]`). A container holds at most
`MAX_ITEMS` items.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel
from pydantic_core import core_schema

from mstar.errors import RequestError
from mstar.events import TensorData

if typing.TYPE_CHECKING:
    from mstar.media import MediaLimits

#: The dtypes a tensor field accepts (torch's names), with their item size in bytes.
TENSOR_DTYPES = {name: getattr(torch, name).itemsize for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
    "bool")}
MEDIA_SCHEMES = ("http://", "https://", "data:", "upload://")
UPLOAD_SCHEME = "upload://"
#: Where a value the API server fetched went: `{BLOB: i}` is the request's i-th blob.
BLOB = "blob"
TENSOR_KEYS = frozenset({"dtype", "shape", "data"})
#: The most items one media container (a dict or list field) holds.
MAX_ITEMS = 64

InputKind = Literal["image", "audio", "video", "tensor"]


def tensor_from_json(value: Mapping[str, Any]) -> torch.Tensor:
    """`{"dtype", "shape", "data"}` as a tensor; ValueError when they disagree."""
    if set(value) != TENSOR_KEYS:
        raise ValueError("a tensor is {\"dtype\", \"shape\", \"data\"} (base64), got keys "
                         f"{sorted(value)}")
    dtype, shape, data = value["dtype"], value["shape"], value["data"]
    if dtype not in TENSOR_DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype!r}; dtypes: "
                         f"{', '.join(TENSOR_DTYPES)}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                       for d in shape)):
        raise ValueError(f"a tensor's shape is a list of non-negative integers, got {shape!r}")
    if not isinstance(data, str):
        raise ValueError("a tensor's data is a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a tensor's data is not valid base64") from None
    want = math.prod(shape) * TENSOR_DTYPES[dtype]
    if len(raw) != want:
        raise ValueError(f"a {dtype} tensor of shape {shape} holds {want} bytes, its data "
                         f"has {len(raw)}")
    return TensorData(dtype, shape, raw).to_tensor()


def is_tensor_file(data: bytes) -> bool:
    """Whether `data` looks like a `.npy` or `.safetensors` file (by content)."""
    if data.startswith(b"\x93NUMPY"):
        return True
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    return 0 < header <= len(data) - 8 and data[8:9] == b"{"


def tensor_from_file(data: bytes, name: str) -> torch.Tensor:
    """A tensor from a `.npy` file or a `.safetensors` file (its one tensor, or the one
    keyed `name`), told apart by content; ValueError for anything else."""
    if data.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            return torch.from_numpy(np.ascontiguousarray(array))
        except (ValueError, TypeError, EOFError) as exc:
            raise ValueError(f"the .npy file could not be read: {exc}") from None
    if is_tensor_file(data):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            tensors = load(data)
        except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"the .safetensors file could not be read: {exc}") from None
        if name in tensors:
            return tensors[name]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        raise ValueError(f"the .safetensors file holds {sorted(tensors)}: one tensor, or "
                         f"one named {name!r}")
    raise ValueError("a tensor file is a .npy or a .safetensors file")


def image_from_tensor(value: torch.Tensor | np.ndarray, limits: MediaLimits | None = None,
                      ) -> Any:
    """An image field's array as the RGB `PIL.Image.Image` every other form decodes to
    (`mstar.media.image_from_array`; its `MediaError` is a ValueError with a status)."""
    from mstar.media import image_from_array

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return image_from_array(value, limits)


def _decoded_type(kind: InputKind) -> type:
    from PIL.Image import Image

    from mstar.media import Audio, Video

    return {"image": Image, "audio": Audio, "video": Video, "tensor": torch.Tensor}[kind]


@dataclass(frozen=True)
class InputField:
    """The marker of a media or tensor field (use it in `Annotated`): what its value
    decodes to, and for audio the sample rate the model wants (None: the file's own), for
    video the frame rate to sample at, the most frames and the rate of its audio track
    (`sample_rate`; None: the sound is not decoded, `Video.audio` is None).

    `input_fields` fills in what the schema declares around the marker: `containers`
    ("dict" for `dict[str, ...]`, "list" for `list[...]`) and whether a lone item is
    accepted (`single`)."""

    kind: InputKind
    sample_rate: int | None = None
    fps: float = 2.0
    max_frames: int | None = None
    containers: frozenset[str] = frozenset()
    single: bool = True

    # -- the schema ------------------------------------------------------------------------
    def validate(self, value: Any) -> Any:
        """The JSON form (a media URL; a tensor dict, checked) or a decoded object."""
        if isinstance(value, _decoded_type(self.kind)):
            return value
        if self.kind == "image" and not isinstance(value, str):
            if isinstance(value, Mapping) and set(value) == TENSOR_KEYS:
                value = tensor_from_json(value)
            if isinstance(value, torch.Tensor | np.ndarray):
                return image_from_tensor(value)
        if self.kind == "tensor":
            if isinstance(value, np.ndarray):
                return torch.from_numpy(value)
            if isinstance(value, Mapping):
                return tensor_from_json(value)
            if isinstance(value, str) and value.startswith(UPLOAD_SCHEME):
                return value
            raise ValueError("a tensor field takes {\"dtype\", \"shape\", \"data\"} or a "
                             f"file part (upload://<file name>), got {type(value).__name__}")
        if isinstance(value, str) and value.lower().startswith(MEDIA_SCHEMES):
            return value
        arrays = ", a tensor" if self.kind == "image" else ""
        raise ValueError(f"{_a(self.kind)} field takes an http(s) URL, a data URL{arrays} or "
                         f"upload://<file name>, got {_shown(value)}")

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        tensor = {"type": "object", "required": ["dtype", "shape", "data"],
                  "properties": {"dtype": {"type": "string", "enum": list(TENSOR_DTYPES)},
                                 "shape": {"type": "array", "items": {"type": "integer"}},
                                 "data": {"type": "string", "contentEncoding": "base64"}}}
        if self.kind == "tensor":
            return {**tensor, "x-mstar": "tensor",
                    "description": "A tensor (C-order bytes, base64), or a .safetensors/.npy "
                                   "file part named after the field."}
        extra = {"x-mstar-sample-rate": self.sample_rate} if self.sample_rate else {}
        url = {"type": "string", "format": "uri"}
        described = {"x-mstar": self.kind, **extra, "description": (
            f"{_a(self.kind).capitalize()}: an http(s) or data URL, or upload://<file name> "
            "(a file part; or a file part named after the field)" + (
                "; or its pixels as a tensor (uint8 [H, W, 3], [H, W], [H, W, 4] or "
                "[3, H, W], or floats in [0, 1]; JSON or a .npy/.safetensors file part)."
                if self.kind == "image" else "."))}
        if self.kind == "image":
            return {"anyOf": [url, tensor], **described}
        return {**url, **described}

    # -- decoding (the data worker) ----------------------------------------------------------
    def decode(self, name: str, value: Any, blobs: Sequence[bytes], limits: MediaLimits
               ) -> Any:
        """Field `name`'s `value` decoded: fetched bytes (`{BLOB: i}`), bytes, a data URL
        or a tensor dict become the field's object; anything else (a decoded object, or a
        form the field's other types accept) is returned as it is."""
        from mstar import media

        if isinstance(value, Mapping) and set(value) == {BLOB}:
            index = value[BLOB]
            if not isinstance(index, int) or not 0 <= index < len(blobs):
                raise ValueError(f"no blob {index!r}: this request carries {len(blobs)}")
            value = blobs[index]
        elif isinstance(value, str) and value.lower().startswith(("http://", "https://")):
            raise ValueError("URLs are fetched by the HTTP server only; in-process, pass a "
                             "data URL, the bytes or the decoded object")
        elif isinstance(value, str) and value.startswith(UPLOAD_SCHEME):
            raise ValueError("upload:// names a file part of a multipart HTTP request")
        elif isinstance(value, str) and value.lower().startswith("data:"):
            value = media.decode_data_url(value, limits)
        elif self.kind == "tensor" and not isinstance(value, bytes):
            return self.validate(value) if isinstance(value, Mapping | np.ndarray) else value
        elif self.kind == "image" and isinstance(value, Mapping) and set(value) == TENSOR_KEYS:
            value = tensor_from_json(value)
        if self.kind == "image" and isinstance(value, torch.Tensor | np.ndarray):
            return image_from_tensor(value, limits)
        if not isinstance(value, bytes):
            return value
        if self.kind == "image":
            if is_tensor_file(value):
                return image_from_tensor(tensor_from_file(value, name), limits)
            return media.load_image(value, limits)
        if self.kind == "audio":
            return media.load_audio(value, limits, sample_rate=self.sample_rate)
        if self.kind == "video":
            return media.load_video(value, limits, fps=self.fps, max_frames=self.max_frames,
                                    audio_rate=self.sample_rate)
        return tensor_from_file(value, name)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    return type(value).__name__


ImageInput = Annotated[Any, InputField("image")]
AudioInput = Annotated[Any, InputField("audio")]
VideoInput = Annotated[Any, InputField("video")]
TensorInput = Annotated[Any, InputField("tensor")]


#: Where an item sits in its field: a dict's key, a list's index; None: the field itself.
Key = str | int | None


def _markers(annotation: Any, inside: str | None = None
             ) -> list[tuple[InputField, str | None]]:
    """Each `InputField` inside `annotation` (through unions and `Annotated`) with the
    container it sits in ("dict", "list"; None: none)."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, InputField):
            return [(meta, inside)]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if inside is None and origin in (dict, Mapping) and len(args) == 2:
        return _markers(args[1], "dict")
    if inside is None and origin in (list, Sequence) and len(args) == 1:
        return _markers(args[0], "list")
    if origin in (dict, Mapping, list, Sequence):
        return []  # nested containers are no media fields
    return [found for arg in args for found in _markers(arg, inside)]


def input_fields(schema: type[BaseModel] | None) -> dict[str, InputField]:
    """The media and tensor fields `schema` declares, by name, each with the containers
    its annotation puts it in."""
    if schema is None:
        return {}
    found = {}
    for name, info in schema.model_fields.items():
        marker = next((m for m in info.metadata if isinstance(m, InputField)), None)
        if marker is not None:
            found[name] = marker
        elif markers := _markers(info.annotation):
            containers = frozenset(c for _, c in markers if c is not None)
            found[name] = dataclasses.replace(markers[0][0], containers=containers,
                                              single=any(c is None for _, c in markers))
    return found


def field_items(field: InputField, value: Any) -> list[tuple[Key, Any]]:
    """The media items of a field's `value` by their key in its container (a str in a
    dict, an int in a list; None: the value is one item, or not media at all). ValueError
    for a container of more than `MAX_ITEMS`."""
    if isinstance(value, Mapping) and "dict" in field.containers and not (
            field.single and set(value) in ({BLOB}, TENSOR_KEYS)):
        items: list[tuple[Key, Any]] = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list | tuple) and "list" in field.containers:
        items = list(enumerate(value))
    else:
        return [(None, value)]
    if len(items) > MAX_ITEMS:
        raise ValueError(f"holds {len(items)} items; at most {MAX_ITEMS}")
    return items


def item_name(name: str, key: Key) -> str:
    """How errors name a field's item: `field`, `field.key` (a dict's), `field[i]`."""
    return name if key is None else f"{name}[{key}]" if isinstance(key, int) else \
        f"{name}.{key}"


def with_items(value: Any, items: Mapping[Key, Any]) -> Any:
    """`value` (a field's) with its items replaced by `items` (keys from `field_items`)."""
    if None in items:
        return items[None]
    if isinstance(value, Mapping):
        return {**value, **items}
    return [items.get(i, v) for i, v in enumerate(value)]


def decode_inputs(request: Mapping[str, Any], fields: Mapping[str, InputField],
                  blobs: Sequence[bytes], limits: MediaLimits) -> dict[str, Any]:
    """`request` with each media and tensor field (each item of a container) decoded
    (`InputField.decode`); a failure is a `RequestError` naming the field or item (the
    media layer's status: 413 over a limit)."""
    decoded = dict(request)
    for name, field in fields.items():
        if decoded.get(name) is None:
            continue
        at = name
        try:
            items = {}
            for key, item in field_items(field, decoded[name]):
                at = item_name(name, key)
                items[key] = field.decode(at, item, blobs, limits)
            decoded[name] = with_items(decoded[name], items)
        except RequestError:
            raise
        except ValueError as exc:
            raise RequestError(f"{at}: {exc}", code=getattr(exc, "status", 400),
                               param=at) from None
    return decoded


__all__ = ["BLOB", "MAX_ITEMS", "TENSOR_DTYPES", "AudioInput", "ImageInput", "InputField", "Key",
           "TensorInput", "VideoInput", "decode_inputs", "field_items", "image_from_tensor",
           "input_fields", "is_tensor_file", "item_name", "tensor_from_file",
           "tensor_from_json", "with_items"]
