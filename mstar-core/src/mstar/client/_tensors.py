"""Tensors between the wire and numpy, without torch: the JSON `{"dtype", "shape", "data"}`
(torch's dtype names, standard base64 of the C-order bytes) and safetensors files, read
and written here so a client machine needs neither torch nor the safetensors package.

numpy has no bfloat16: a bfloat16 tensor becomes float32 (exactly; its bits are the upper
half of a float32's). A torch tensor given as input keeps its own dtype on the wire.
numpy is imported only when a tensor is converted.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

#: Torch's dtype names with their little-endian numpy type (bfloat16 is read apart).
_NUMPY = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "int64": "<i8",
          "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "uint16": "<u2",
          "uint32": "<u4", "uint64": "<u8", "bool": "?", "complex64": "<c8",
          "complex128": "<c16"}
#: safetensors' dtype codes as torch's names.
_SAFETENSORS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
                "C64": "complex64"}
_SAFETENSORS_CODE = {name: code for code, name in _SAFETENSORS.items()}
NPY_MAGIC = b"\x93NUMPY"


def to_numpy(dtype: str, shape: list[int], data: bytes) -> np.ndarray:
    """The array of a wire tensor (a writable copy; bfloat16 as float32)."""
    import numpy as np

    if dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype("<u4") << 16
        return bits.view("<f4").astype(np.float32).reshape(shape)
    if dtype not in _NUMPY:
        raise ValueError(f"tensor dtype {dtype!r} has no numpy equivalent")
    return np.frombuffer(data, dtype=_NUMPY[dtype]).reshape(shape).copy()


def from_json(value: dict[str, Any]) -> np.ndarray:
    """The array of a tensor as the JSON answer writes it."""
    return to_numpy(value["dtype"], list(value["shape"]), base64.b64decode(value["data"]))


def is_tensor(value: object) -> bool:
    """A numpy array or a torch tensor (checked without importing either)."""
    numpy, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    return (numpy is not None and isinstance(value, numpy.ndarray)) or \
        (torch is not None and isinstance(value, torch.Tensor))


def wire_tensor(value: object) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, C-order little-endian bytes) of a numpy array or torch tensor."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        from mstar.events import TensorData

        t = TensorData.from_tensor(value)
        return t.dtype, t.shape, t.data
    import numpy as np

    array = np.asarray(value)
    if array.dtype.name not in _NUMPY:
        raise ValueError(f"an array of dtype {array.dtype} cannot be sent as a tensor")
    array = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    return array.dtype.name, list(array.shape), array.tobytes()


def to_json(value: object) -> dict[str, Any]:
    """The tensor JSON of a numpy array or torch tensor."""
    dtype, shape, data = wire_tensor(value)
    return {"dtype": dtype, "shape": shape, "data": base64.b64encode(data).decode("ascii")}


def tensor_file(name: str, value: object) -> tuple[str, bytes]:
    """(file name, content) of a tensor sent as a file part: `.npy` for a numpy array, a
    one-tensor `.safetensors` keyed by `name` for a torch tensor (bfloat16 has no npy)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        dtype, shape, data = wire_tensor(value)
        return f"{name}.safetensors", write_safetensors({name: (dtype, shape, data)})
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(value), allow_pickle=False)
    return f"{name}.npy", buf.getvalue()


def write_safetensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A safetensors file of (dtype name, shape, bytes) by name."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        if dtype not in _SAFETENSORS_CODE:
            raise ValueError(f"safetensors has no dtype {dtype!r}")
        header[name] = {"dtype": _SAFETENSORS_CODE[dtype], "shape": shape,
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(d for _, _, d in
                                                                tensors.values())


def read_safetensors(body: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays by name, metadata) of a safetensors file."""
    if len(body) < 8:
        raise ValueError("a safetensors body is at least 8 bytes")
    (size,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + size])
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + size
    arrays = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS:
            raise ValueError(f"tensor {name!r}: unknown safetensors dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        arrays[name] = to_numpy(_SAFETENSORS[info["dtype"]], list(info["shape"]),
                                body[start + begin:start + end])
    return arrays, metadata
