"""Tensors as raw bytes, for the transports that cross processes.

Every dtype whose elements are whole bytes travels bit for bit (bool, complex, bfloat16,
float8). A tensor of at most `INLINE_MAX` bytes travels inside its handle (`inline`):
per-token outputs then cost no segment, no connection and no free.
"""

from __future__ import annotations

import torch

from mstar.communication.messages import Handle

#: Tensors up to this size travel in the handle itself.
INLINE_MAX = 64 << 10
#: The key of an inline handle (it names no stored item).
INLINE_KEY = "-"
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as a flat, contiguous uint8 CPU tensor (a view when the
    tensor already is contiguous on the CPU). The layout is copied as integers of the
    element's size: exotic dtypes (float4) have no copy kernel of their own."""
    flat = tensor.detach()
    if flat.element_size() in _SAME_SIZE_INT:
        flat = flat.view(_SAME_SIZE_INT[flat.element_size()])
    flat = flat.to("cpu").contiguous().reshape(-1)
    try:
        return flat.view(torch.uint8)
    except RuntimeError as exc:
        raise TypeError(f"cannot send a {tensor.dtype} tensor as raw bytes: {exc}") from exc


def handle_dtype(handle: Handle) -> torch.dtype:
    """The torch dtype a handle names ("float32" -> torch.float32)."""
    dtype = getattr(torch, handle.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"handle {handle.key!r} names an unknown dtype {handle.dtype!r}")
    return dtype


def handle_nbytes(handle: Handle) -> int:
    numel = 1
    for size in handle.shape:
        numel *= size
    return numel * handle_dtype(handle).itemsize


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def from_host_bytes(data: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Rebuild the tensor a handle describes from its raw bytes (flat uint8)."""
    return data.view(handle_dtype(handle)).reshape(handle.shape)


def make_handle(tensor: torch.Tensor, key: str, owner: str, request_id: str,
                inline: bytes | None = None) -> Handle:
    return Handle(key=key, owner=owner, request_id=request_id,
                  dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                  inline=inline)


def inline_handle(tensor: torch.Tensor, owner: str, request_id: str) -> Handle:
    """A handle that carries the tensor's bytes (for tensors of at most `INLINE_MAX`)."""
    return make_handle(tensor, INLINE_KEY, owner, request_id,
                       inline=host_bytes(tensor).numpy().tobytes())


def inline_tensor(handle: Handle) -> torch.Tensor:
    """The tensor an inline handle carries (the receiver's own, writable copy)."""
    nbytes = handle_nbytes(handle)
    if len(handle.inline) != nbytes:
        raise ValueError(f"inline tensor of request {handle.request_id} holds "
                         f"{len(handle.inline)} bytes; {handle.dtype}{handle.shape} needs "
                         f"{nbytes}")
    data = torch.frombuffer(bytearray(handle.inline), dtype=torch.uint8) if nbytes else \
        torch.empty(0, dtype=torch.uint8)
    return from_host_bytes(data, handle)
