"""The SHM tensor transport: tensors between processes of one node through POSIX shared memory.

`put` writes the tensor's raw bytes into a new segment `/dev/shm/mstar_<tag>_<pid>_<n>`
(the tag names the deployment, so a launcher can remove what a crashed deployment left
with `cleanup_deployment`); the handle's key is the segment's name. `get` reads it into a
tensor of the receiver's own; `free` unlinks it. Segments are plain files of the tmpfs at
/dev/shm, written and read with `write`/`pread`/`mmap` on their file descriptor, so no
`multiprocessing.resource_tracker` is involved: its exit-time unlinking would destroy
segments a process created for others. Their lifetime is ours: the receiver unlinks on
`free`, `free_request` unlinks what a request left, `close` unlinks what is left of an
instance, `cleanup_deployment` what is left of a deployment. Linux only (/dev/shm).

CUDA tensors are copied to host on `put` and `get` returns CPU tensors; CUDA IPC for GPU
tensors on one node is a later optimisation behind the same interface.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import re
import threading
from pathlib import Path

import torch

from mstar.communication.messages import Handle

SHM_DIR = Path("/dev/shm")
#: The key of an empty tensor: no bytes, so no segment (dtype and shape are in the handle).
EMPTY_KEY = "-"
#: From this size on `get` maps the segment copy-on-write instead of copying it (measured:
#: below 1 MiB a `pread` into a new tensor is faster; above it the mapping wins, 64 MiB
#: round trips take about half the time). The receiver's tensor is its own either way.
MAP_THRESHOLD = 1 << 20

_ids = itertools.count()  # per process: two instances in one process never share a name


def deployment_tag(deployment_id: str) -> str:
    """The short name of a deployment in segment names: the id itself when it is at most
    8 letters or digits, else 8 hex digits of its hash (names must stay within 30
    characters; the tag never holds "_", so one deployment's prefix never matches
    another's)."""
    if re.fullmatch(r"[A-Za-z0-9]{1,8}", deployment_id):
        return deployment_id
    return hashlib.blake2b(deployment_id.encode(), digest_size=4).hexdigest()


def cleanup_deployment(deployment_id: str) -> int:
    """Unlink every segment deployment `deployment_id` left (after a crash or SIGKILL);
    returns how many."""
    removed = 0
    for path in SHM_DIR.glob(f"mstar_{deployment_tag(deployment_id)}_*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes as a flat, contiguous uint8 CPU tensor (a view when the
    tensor already is contiguous on the CPU). Any dtype whose elements are whole bytes
    works: bool, complex, bfloat16 and float8 travel bit for bit."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
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


def from_host_bytes(data: torch.Tensor, handle: Handle) -> torch.Tensor:
    """Rebuild the tensor a handle describes from its raw bytes (flat uint8)."""
    return data.view(handle_dtype(handle)).reshape(handle.shape)


class ShmTransport:
    """Tensors through /dev/shm segments, one per `put`.

    The sender remembers the segments it created until they are freed, the receiver the
    ones it read and has not freed: `free_request` unlinks both kinds for a request (data
    never read after a cancel; data read but never freed), and `live_handles` counts those
    of them that still exist (a segment the other side unlinked no longer counts)."""

    def __init__(self, address: str, *, deployment_id: str, host: str = "127.0.0.1",
                 device: str | None = None) -> None:
        if not SHM_DIR.is_dir():
            raise RuntimeError(f"the SHM transport needs {SHM_DIR} (Linux); use TCP")
        self.address = address
        self.deployment_id = deployment_id
        self._prefix = f"mstar_{deployment_tag(deployment_id)}_"
        #: segment name -> (request id, owner): the segments created or read here
        self._known: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()

    def put(self, tensor: torch.Tensor, request_id: str, owner: str | None = None) -> Handle:
        data = host_bytes(tensor)
        key = EMPTY_KEY
        if data.numel():
            key = f"{self._prefix}{os.getpid()}_{_base36(next(_ids))}"
            _write_segment(SHM_DIR / key, data)
            with self._lock:
                self._known[key] = (request_id, owner or self.address)
        return Handle(key=key, owner=owner or self.address, request_id=request_id,
                      dtype=str(tensor.dtype).removeprefix("torch."),
                      shape=list(tensor.shape))

    def get(self, handle: Handle) -> torch.Tensor:
        nbytes = handle_nbytes(handle)
        if handle.key == EMPTY_KEY:
            return torch.empty(handle.shape, dtype=handle_dtype(handle))
        try:
            fd = os.open(self._path(handle), os.O_RDONLY)
        except FileNotFoundError:
            raise KeyError(f"SHM segment {handle.key} of request {handle.request_id} is gone "
                           f"(freed, or never created)") from None
        try:
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise ValueError(f"SHM segment {handle.key} holds {size} bytes; its handle "
                                 f"({handle.dtype}{handle.shape}) needs {nbytes}")
            data = _map_private(fd, nbytes) if nbytes >= MAP_THRESHOLD else _read(fd, nbytes)
        finally:
            os.close(fd)
        with self._lock:
            self._known.setdefault(handle.key, (handle.request_id, self.address))
        return from_host_bytes(data, handle)

    def free(self, handle: Handle) -> None:
        if handle.key == EMPTY_KEY:
            return
        self._path(handle)
        with self._lock:
            self._known.pop(handle.key, None)
        _unlink(handle.key)

    def _path(self, handle: Handle) -> Path:
        """The segment of a handle, which must be one of this deployment's (a key comes
        from a message: never a path elsewhere)."""
        if not handle.key.startswith(self._prefix) or "/" in handle.key:
            raise ValueError(f"{handle.key!r} is not an SHM segment of deployment "
                             f"{self.deployment_id!r}")
        return SHM_DIR / handle.key

    def free_request(self, request_id: str) -> None:
        with self._lock:
            # only what is addressed to this component: the others' items are theirs to
            # free (a receiver frees what arrives after it dropped the request)
            names = [name for name, (rid, owner) in self._known.items()
                     if rid == request_id and owner == self.address]
            for name in names:
                del self._known[name]
        for name in names:
            _unlink(name)

    def live_handles(self) -> int:
        """Segments this instance created or read that still exist (the others are
        forgotten here)."""
        with self._lock:
            for name in [n for n in self._known if not (SHM_DIR / n).exists()]:
                del self._known[name]
            return len(self._known)

    def close(self) -> None:
        """Unlink every segment this instance still knows."""
        with self._lock:
            names, self._known = list(self._known), {}
        for name in names:
            _unlink(name)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def _write_segment(path: Path, data: torch.Tensor) -> None:
    """Create the segment and write the bytes (`write` on tmpfs: one copy, no page faults
    in this process; a full /dev/shm raises here instead of a SIGBUS later)."""
    view = memoryview(data.numpy())
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
    except OSError as exc:
        os.close(fd)
        _unlink(path.name)
        raise OSError(exc.errno, f"cannot write {len(view)} bytes to SHM segment {path}: "
                                 f"{exc.strerror} (is /dev/shm large enough?)") from exc
    os.close(fd)


def _read(fd: int, nbytes: int) -> torch.Tensor:
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], done)
        if not got:
            raise EOFError(f"SHM segment ended after {done} of {nbytes} bytes")
        done += got
    return out


def _map_private(fd: int, nbytes: int) -> torch.Tensor:
    """A copy-on-write mapping of the segment: the receiver's own copy (writes stay
    private), made by the kernel page by page instead of a copy up front. It outlives the
    segment's name: `free` unlinks it, the pages go when the tensor does."""
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / name).unlink()
