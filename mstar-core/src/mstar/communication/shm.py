"""The SHM tensor transport: tensors between processes of one node through POSIX shared memory.

Each sender keeps a pool of segments, files of the tmpfs at /dev/shm named
`mstar_<tag>_<pid>_<n>` (the tag names the deployment, so the launcher removes what a
crashed deployment left with `cleanup_deployment`: at a clean stop, and at the next start
for a deployment whose API server was killed, `mstar.serving.leftovers`). A segment is a 4 KiB header and a data
area whose capacity is a power of two; the sender keeps it mapped and `put` copies the
tensor into it, so a reused segment costs one memory copy and no page allocation (a fresh
tmpfs page is what makes a new segment slow: measured, a new 64 MiB segment takes 4x the
time of a copy into one that exists).

The header holds two counters: `put_gen`, bumped by every put, and `released_gen`, set by
the receiver when it is done with that put. A handle's key is `<name>#<gen>`. The receiver
maps large tensors copy-on-write (its tensor is its own: writes stay private) and copies
small ones; it releases the segment once it has freed the handle *and* every tensor it
made from it is gone (a finalizer on the mapping), because until then its unwritten pages
still read the file. A segment whose `released_gen` equals its `put_gen` is free again.

Tensors of at most `INLINE_MAX` bytes travel inside the handle and use no segment. No
`multiprocessing.resource_tracker` is involved: its exit-time unlinking would destroy
segments a process created for others. `close` unlinks a sender's pool (receivers keep
what they mapped until they drop it); `cleanup_deployment` removes what a killed process
left. Linux only (/dev/shm).

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
import struct
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from mstar.communication.messages import Handle
from mstar.communication.tensor_bytes import (
    INLINE_MAX,
    from_host_bytes,
    handle_nbytes,
    host_bytes,
    inline_handle,
    inline_tensor,
    make_handle,
    tensor_nbytes,
)

SHM_DIR = Path("/dev/shm")
#: From this size on `get` maps the segment copy-on-write instead of copying it (measured:
#: below 1 MiB a `pread` into a new tensor is faster).
MAP_THRESHOLD = 1 << 20
HEADER_BYTES = 4096  # keeps the data page-aligned, so it can be mapped on its own
_GENS = struct.Struct("<QQ")  # put_gen, released_gen
_RELEASED_AT = 8
_GEN = struct.Struct("<Q")
#: Free segments a sender keeps per capacity; beyond that they are unlinked.
IDLE_PER_CAPACITY = 2

_ids = itertools.count()  # per process: two instances in one process never share a name


def deployment_tag(deployment_id: str) -> str:
    """The short name of a deployment in segment names: the id itself when it is at most
    8 letters or digits, else 8 hex digits of its hash (the tag never holds "_", so one
    deployment's prefix never matches another's)."""
    if re.fullmatch(r"[A-Za-z0-9]{1,8}", deployment_id):
        return deployment_id
    return hashlib.blake2b(deployment_id.encode(), digest_size=4).hexdigest()


def _deployment_segments(deployment_id: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"mstar_{deployment_tag(deployment_id)}_*"))


def cleanup_deployment(deployment_id: str) -> int:
    """Unlink every segment deployment `deployment_id` left (after a crash or SIGKILL);
    returns how many."""
    removed = 0
    for path in _deployment_segments(deployment_id):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def segments_in_use(deployment_id: str) -> list[str]:
    """The deployment's segments that hold a tensor not yet released by its receiver (the
    pools' free segments are not in use: a leak shows here)."""
    busy = []
    for path in _deployment_segments(deployment_id):
        try:
            with path.open("rb") as segment:
                put_gen, released_gen = _GENS.unpack(segment.read(_GENS.size))
        except (FileNotFoundError, struct.error):
            continue
        if put_gen != released_gen:
            busy.append(path.name)
    return busy


@dataclass(eq=False)
class _Segment:
    """A segment of the sender's pool, mapped shared for as long as the pool holds it."""

    name: str
    capacity: int
    mapping: mmap.mmap
    data: torch.Tensor  # uint8 view of the data area
    gen: int = 0
    request_id: str = ""
    owner: str = ""

    def is_free(self) -> bool:
        return _GENS.unpack_from(self.mapping)[1] == self.gen

    def claim(self, request_id: str, owner: str) -> _Segment:
        """Taken for a new put (the pool's lock held): in use until released."""
        self.gen += 1
        self.request_id, self.owner = request_id, owner
        _GENS.pack_into(self.mapping, 0, self.gen, self.gen - 1)
        return self

    def release(self) -> None:
        _GEN.pack_into(self.mapping, _RELEASED_AT, self.gen)


@dataclass(eq=False)
class _Read:
    """A handle this instance read: released once freed here and no tensor made from it
    is alive."""

    request_id: str
    owner: str
    freed: bool = False
    mapped: int = 0  # live copy-on-write mappings


class ShmTransport:
    """Tensors through a sender-side pool of /dev/shm segments (see the module docstring).

    `live_handles` counts the sender's segments still in use and the handles read here
    and not yet freed."""

    def __init__(self, address: str, *, deployment_id: str, host: str = "127.0.0.1",
                 device: str | None = None) -> None:
        if not SHM_DIR.is_dir():
            raise RuntimeError(f"the SHM transport needs {SHM_DIR} (Linux); use TCP")
        self.address = address
        self.deployment_id = deployment_id
        self._prefix = f"mstar_{deployment_tag(deployment_id)}_"
        self._pool: list[_Segment] = []
        self._read: dict[str, _Read] = {}  # key -> state, for handles read here
        self._lock = threading.Lock()

    # -- the sender's side ----------------------------------------------------------------
    def put(self, tensor: torch.Tensor, request_id: str, owner: str | None = None) -> Handle:
        owner = owner or self.address
        nbytes = tensor_nbytes(tensor)
        if nbytes <= INLINE_MAX:
            return inline_handle(tensor, owner, request_id)
        segment = self._take(nbytes, request_id, owner)
        segment.data[:nbytes].copy_(host_bytes(tensor))
        return make_handle(tensor, f"{segment.name}#{segment.gen}", owner, request_id)

    def _take(self, nbytes: int, request_id: str, owner: str) -> _Segment:
        """A free segment of the pool that fits, or a new one, claimed for one put; free
        segments beyond `IDLE_PER_CAPACITY` of a capacity are unlinked."""
        capacity = 1 << (nbytes - 1).bit_length()
        with self._lock:
            free = [s for s in self._pool if s.capacity == capacity and s.is_free()]
            for extra in free[IDLE_PER_CAPACITY + 1:]:
                self._drop(extra)
            if free:
                return free[0].claim(request_id, owner)
        segment = _create_segment(f"{self._prefix}{os.getpid()}_{_base36(next(_ids))}",
                                  capacity)
        with self._lock:
            self._pool.append(segment)
            return segment.claim(request_id, owner)

    def _drop(self, segment: _Segment) -> None:
        self._pool.remove(segment)
        _unlink(segment.name)
        segment.data = torch.empty(0, dtype=torch.uint8)
        with contextlib.suppress(BufferError):
            segment.mapping.close()

    def free_request(self, request_id: str) -> None:
        """Release what this component owns of the request: segments it addressed to
        itself, and handles it read and has not freed (the others are their receivers' to
        free: a receiver frees what arrives after it dropped the request)."""
        with self._lock:
            for segment in self._pool:
                if (segment.request_id == request_id and segment.owner == self.address
                        and not segment.is_free()):
                    segment.release()
            keys = [k for k, r in self._read.items()
                    if r.request_id == request_id and r.owner == self.address]
        for key in keys:
            self._free_key(key)

    # -- the receiver's side --------------------------------------------------------------
    def get(self, handle: Handle) -> torch.Tensor:
        if handle.inline is not None:
            return inline_tensor(handle)
        name, gen = self._parse(handle)
        nbytes = handle_nbytes(handle)
        try:
            fd = os.open(SHM_DIR / name, os.O_RDONLY)
        except FileNotFoundError:
            raise self._gone(handle) from None
        try:
            put_gen, released_gen = _GENS.unpack(os.pread(fd, _GENS.size, 0))
            if put_gen != gen or released_gen == gen:
                raise self._gone(handle)
            size = os.fstat(fd).st_size - HEADER_BYTES
            if size < nbytes:
                raise ValueError(f"SHM segment {name} holds {size} bytes; handle "
                                 f"{handle.key} ({handle.dtype}{handle.shape}) needs {nbytes}")
            if nbytes < MAP_THRESHOLD:
                data, mapping = _read(fd, nbytes), None
            else:
                mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, offset=HEADER_BYTES,
                                    prot=mmap.PROT_READ | mmap.PROT_WRITE)
                data = torch.frombuffer(mapping, dtype=torch.uint8)
        finally:
            os.close(fd)
        with self._lock:
            state = self._read.setdefault(handle.key, _Read(handle.request_id, handle.owner))
            if mapping is not None:
                state.mapped += 1
                weakref.finalize(mapping, self._unmapped, handle.key)
        return from_host_bytes(data, handle)

    def free(self, handle: Handle) -> None:
        """Done with the handle: its segment is released now, or when the last tensor
        `get` made from it is gone."""
        if handle.inline is not None:
            return
        self._parse(handle)
        with self._lock:
            known = handle.key in self._read
            if not known:
                self._read[handle.key] = _Read(handle.request_id, handle.owner)
        self._free_key(handle.key)

    def _free_key(self, key: str) -> None:
        with self._lock:
            state = self._read.get(key)
            if state is None:
                return
            state.freed = True
            if state.mapped:
                return  # the finalizer of the last mapping releases it
            del self._read[key]
        _release(key)

    def _unmapped(self, key: str) -> None:
        with self._lock:
            state = self._read.get(key)
            if state is None:
                return
            state.mapped -= 1
            if state.mapped or not state.freed:
                return
            del self._read[key]
        _release(key)

    def _parse(self, handle: Handle) -> tuple[str, int]:
        """The segment name and generation of a handle, which must name one of this
        deployment's segments (a key comes from a message: never a path elsewhere)."""
        name, _, gen = handle.key.partition("#")
        if not name.startswith(self._prefix) or "/" in name or not gen.isdigit():
            raise ValueError(f"{handle.key!r} is not an SHM segment of deployment "
                             f"{self.deployment_id!r}")
        return name, int(gen)

    @staticmethod
    def _gone(handle: Handle) -> KeyError:
        return KeyError(f"SHM segment {handle.key} of request {handle.request_id} is gone "
                        f"(freed, or never created)")

    # -- both -----------------------------------------------------------------------------
    def live_handles(self) -> int:
        """Segments of this sender in use plus handles read here and not yet freed."""
        with self._lock:
            in_use = sum(not s.is_free() for s in self._pool)
            return in_use + sum(not r.freed for r in self._read.values())

    def close(self) -> None:
        """Unlink the pool (a receiver keeps what it mapped until it drops it) and free
        every handle read here (a mapping still alive releases its segment when its last
        tensor goes, at the latest when the process exits)."""
        with self._lock:
            for segment in list(self._pool):
                self._drop(segment)
            keys = list(self._read)
        for key in keys:
            self._free_key(key)


def _create_segment(name: str, capacity: int) -> _Segment:
    """A new segment, its tmpfs pages allocated up front (a full /dev/shm raises here
    instead of a SIGBUS later)."""
    path = SHM_DIR / name
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.posix_fallocate(fd, 0, HEADER_BYTES + capacity)
        mapping = mmap.mmap(fd, HEADER_BYTES + capacity, flags=mmap.MAP_SHARED)
    except OSError as exc:
        _unlink(name)
        raise OSError(exc.errno, f"cannot make a {capacity}-byte SHM segment {path}: "
                                 f"{exc.strerror} (is /dev/shm large enough?)") from exc
    finally:
        os.close(fd)
    data = torch.frombuffer(mapping, dtype=torch.uint8, offset=HEADER_BYTES, count=capacity)
    return _Segment(name, capacity, mapping, data)


def _release(key: str) -> None:
    """Tell the sender its segment is free again: `released_gen` = the handle's gen. A
    segment its sender already unlinked needs nothing."""
    name, _, gen = key.partition("#")
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(SHM_DIR / name, os.O_WRONLY)
        try:
            os.pwrite(fd, _GEN.pack(int(gen)), _RELEASED_AT)
        finally:
            os.close(fd)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def _read(fd: int, nbytes: int) -> torch.Tensor:
    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], HEADER_BYTES + done)
        if not got:
            raise EOFError(f"SHM segment ended after {done} of {nbytes} bytes")
        done += got
    return out


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (SHM_DIR / name).unlink()
