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
`mstar.events.TensorData` has), or a `.safetensors` / `.npy` file part.
"""

from __future__ import annotations

import base64
import binascii
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

InputKind = Literal["image", "audio", "video", "tensor"]


def tensor_from_json(value: Mapping[str, Any]) -> torch.Tensor:
    """`{"dtype", "shape", "data"}` as a tensor; ValueError when they disagree."""
    if set(value) != {"dtype", "shape", "data"}:
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


def tensor_from_file(data: bytes, name: str) -> torch.Tensor:
    """A tensor from a `.npy` file or a `.safetensors` file (its one tensor, or the one
    keyed `name`), told apart by content; ValueError for anything else."""
    if data.startswith(b"\x93NUMPY"):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
            return torch.from_numpy(np.ascontiguousarray(array))
        except (ValueError, TypeError, EOFError) as exc:
            raise ValueError(f"the .npy file could not be read: {exc}") from None
    header = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    if 0 < header <= len(data) - 8 and data[8:9] == b"{":
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


def _decoded_type(kind: InputKind) -> type:
    from PIL.Image import Image

    from mstar.media import Audio, Video

    return {"image": Image, "audio": Audio, "video": Video, "tensor": torch.Tensor}[kind]


@dataclass(frozen=True)
class InputField:
    """The marker of a media or tensor field (use it in `Annotated`): what its value
    decodes to, and for audio the sample rate the model wants (None: the file's own), for
    video the frame rate to sample at, the most frames and the rate of its audio track
    (`sample_rate`; None: the sound is not decoded, `Video.audio` is None)."""

    kind: InputKind
    sample_rate: int | None = None
    fps: float = 2.0
    max_frames: int | None = None

    # -- the schema ------------------------------------------------------------------------
    def validate(self, value: Any) -> Any:
        """The JSON form (a media URL; a tensor dict, checked) or a decoded object."""
        if isinstance(value, _decoded_type(self.kind)):
            return value
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
        raise ValueError(f"{_a(self.kind)} field takes an http(s) URL, a data URL or "
                         f"upload://<file name>, got {_shown(value)}")

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.validate)

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        if self.kind == "tensor":
            return {"type": "object", "x-mstar": "tensor", "required": ["dtype", "shape", "data"],
                    "properties": {"dtype": {"type": "string", "enum": list(TENSOR_DTYPES)},
                                   "shape": {"type": "array", "items": {"type": "integer"}},
                                   "data": {"type": "string", "contentEncoding": "base64"}},
                    "description": "A tensor (C-order bytes, base64), or a .safetensors/.npy "
                                   "file part named after the field."}
        extra = {"x-mstar-sample-rate": self.sample_rate} if self.sample_rate else {}
        return {"type": "string", "format": "uri", "x-mstar": self.kind, **extra,
                "description": f"{_a(self.kind).capitalize()}: an http(s) or data URL, or upload://<file "
                               "name> (a file part; or a file part named after the field)."}

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
        if not isinstance(value, bytes):
            return value
        if self.kind == "image":
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


def _marker(annotation: Any) -> InputField | None:
    """The `InputField` inside `annotation` (through unions and `Annotated`), if any."""
    for meta in getattr(annotation, "__metadata__", ()):
        if isinstance(meta, InputField):
            return meta
    for arg in typing.get_args(annotation):
        found = _marker(arg)
        if found is not None:
            return found
    return None


def input_fields(schema: type[BaseModel] | None) -> dict[str, InputField]:
    """The media and tensor fields `schema` declares, by name."""
    if schema is None:
        return {}
    found = {}
    for name, info in schema.model_fields.items():
        marker = next((m for m in info.metadata if isinstance(m, InputField)), None)
        marker = marker or _marker(info.annotation)
        if marker is not None:
            found[name] = marker
    return found


def decode_inputs(request: Mapping[str, Any], fields: Mapping[str, InputField],
                  blobs: Sequence[bytes], limits: MediaLimits) -> dict[str, Any]:
    """`request` with each media and tensor field decoded (`InputField.decode`); a failure
    is a `RequestError` naming the field (the media layer's status: 413 over a limit)."""
    decoded = dict(request)
    for name, field in fields.items():
        if decoded.get(name) is None:
            continue
        try:
            decoded[name] = field.decode(name, decoded[name], blobs, limits)
        except RequestError:
            raise
        except ValueError as exc:
            raise RequestError(f"{name}: {exc}", code=getattr(exc, "status", 400),
                               param=name) from None
    return decoded


__all__ = ["BLOB", "TENSOR_DTYPES", "AudioInput", "ImageInput", "InputField", "TensorInput",
           "VideoInput", "decode_inputs", "input_fields", "tensor_from_file",
           "tensor_from_json"]
