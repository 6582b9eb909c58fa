"""The RDMA tensor transport: receivers read tensors out of the sender's registered memory
with Mooncake's transfer engine (RDMA where the machine has RDMA devices, else Mooncake's
TCP protocol).

Each instance runs one `TransferEngine` (P2P handshake, no metadata server) and one pool
of memory registered with it (`RegisteredPool`). `put` copies the tensor into a pool slice
after a 16-byte header (the item's id, then a "done" word) and returns a handle whose key
says where it is: `"<host>:<rpc port>/<id>@<address>"`. `get` reads header and bytes in one
one-sided read into a slice of the receiver's own pool, checks the id (a freed, reused or
foreign slice is refused), and copies the bytes out. `free` is the control path: the
receiver writes the item's id into the sender's "done" word (one small one-sided write), and
the sender takes back every slice marked done the next time it allocates or counts. So
no server thread of ours runs, and the memory stays with the component that made the
tensor until the receiver is done with it. Tensors of at most `INLINE_MAX` bytes travel
inside the handle instead.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mstar.communication.messages import Handle
from mstar.communication.tcp import interface_address
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

#: Bytes registered at a time; a pool grows by at least its size so far (doubling).
CHUNK_BYTES = 16 << 20
#: Slices start on this boundary (the header's words stay aligned).
ALIGN = 64
#: id (u64) and done (u64) ahead of every stored tensor's bytes.
HEADER = 16
RDMA_DEVICES = Path("/sys/class/infiniband")
#: Mooncake's highest port: it ignores a range above it (and picks its own).
MAX_PORT = 32767
_PORT_ENV = ("MC_MIN_RPC_PORT", "MC_MAX_RPC_PORT")
_import_lock = threading.Lock()
#: The ports this process's Mooncake was told to use (None: its default range).
_ports: tuple[int, int] | None = None


def engine_protocol(requested: str | None = None) -> str:
    """Mooncake's protocol: `requested` ("rdma" or "tcp"), else "rdma" where the machine
    has RDMA devices and Mooncake's own `MC_FORCE_TCP` is unset, else "tcp"."""
    if requested is not None:
        if requested not in ("rdma", "tcp"):
            raise ValueError(f"Mooncake protocol {requested!r}: use 'rdma' or 'tcp'")
        return requested
    has_devices = RDMA_DEVICES.is_dir() and any(RDMA_DEVICES.iterdir())
    return "rdma" if has_devices and not os.environ.get("MC_FORCE_TCP") else "tcp"


def _engine_class(port: int = 0):
    """`mooncake.engine.TransferEngine`, or an error that says how to get it. Mooncake
    reads its port range (`MC_MIN_RPC_PORT`..`MC_MAX_RPC_PORT`) when it is first imported:
    `port` > 0 makes it [port, port + 1] (handshake and data listeners) for this process."""
    global _ports
    with _import_lock:
        if "mooncake.engine" in sys.modules:
            return sys.modules["mooncake.engine"].TransferEngine
        saved = {name: os.environ.get(name) for name in _PORT_ENV}
        if port:
            os.environ.update(MC_MIN_RPC_PORT=str(port), MC_MAX_RPC_PORT=str(port + 1))
        os.environ.setdefault("MC_LOG_LEVEL", "WARNING")  # it logs each start at INFO
        try:
            import mooncake.engine
        except ImportError as exc:
            raise RuntimeError(
                f"the RDMA tensor transport needs Mooncake ({exc}): pip install "
                "'mstar-core[rdma]' (mooncake-transfer-engine on GPU machines, "
                "mooncake-transfer-engine-non-cuda elsewhere; libibverbs1 and librdmacm1 "
                "must be installed), or use --tensor-comm-protocol SHM or TCP") from exc
        finally:
            for name, value in saved.items():  # this process's children choose their own
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if port:
            _ports = (port, port + 1)
    return mooncake.engine.TransferEngine


@dataclass
class _Slice:
    chunk: int  # index into RegisteredPool.chunks
    offset: int
    length: int

    def view(self, pool: RegisteredPool) -> torch.Tensor:
        return pool.chunks[self.chunk][self.offset:self.offset + self.length]


class RegisteredPool:
    """Memory registered once with the engine, handed out in slices (first fit, freed
    ranges merged). It grows by whole chunks and keeps them: registering memory is what an
    RDMA transfer costs up front (the pages are pinned), so the pool stays at its peak."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.chunks: list[torch.Tensor] = []
        self._free: list[list[tuple[int, int]]] = []  # per chunk: sorted (offset, length)
        self._used = 0

    def take(self, nbytes: int) -> _Slice:
        length = -(-max(nbytes, 1) // ALIGN) * ALIGN
        for index, ranges in enumerate(self._free):
            for k, (offset, size) in enumerate(ranges):
                if size >= length:
                    if size == length:
                        del ranges[k]
                    else:
                        ranges[k] = (offset + length, size - length)
                    self._used += length
                    return _Slice(index, offset, length)
        self._grow(max(length, CHUNK_BYTES, self.capacity()))
        return self.take(nbytes)

    def give(self, piece: _Slice) -> None:
        ranges = self._free[piece.chunk]
        ranges.append((piece.offset, piece.length))
        ranges.sort()
        merged = [ranges[0]]
        for offset, size in ranges[1:]:
            last_offset, last_size = merged[-1]
            if last_offset + last_size == offset:
                merged[-1] = (last_offset, last_size + size)
            else:
                merged.append((offset, size))
        self._free[piece.chunk] = merged
        self._used -= piece.length

    def capacity(self) -> int:
        return sum(chunk.numel() for chunk in self.chunks)

    def used(self) -> int:
        """Bytes in slices handed out and not given back."""
        return self._used

    def address(self, piece: _Slice) -> int:
        return self.chunks[piece.chunk].data_ptr() + piece.offset

    def _grow(self, nbytes: int) -> None:
        chunk = torch.empty(nbytes, dtype=torch.uint8)
        status = self._engine.register_memory(chunk.data_ptr(), nbytes)
        if status != 0:
            raise RuntimeError(f"Mooncake could not register {nbytes} bytes (status {status})")
        self.chunks.append(chunk)
        self._free.append([(0, nbytes)])

    def close(self) -> None:
        for chunk in self.chunks:
            self._engine.unregister_memory(chunk.data_ptr())
        self._engine = None
        self.chunks.clear()
        self._free.clear()
        self._used = 0


@dataclass
class _Item:
    request_id: str
    owner: str
    piece: _Slice


class MooncakeTransport:
    """Tensors read over Mooncake from the sender's registered memory.

    `host` (or the IPv4 address of interface `device`) is where the engine listens and
    what handles advertise. `mooncake_port` > 0 starts the engine's handshake (and, over
    Mooncake TCP, its data) listener on that port or the next one; 0 lets Mooncake pick.
    `protocol`: see `engine_protocol`."""

    def __init__(self, address: str, *, deployment_id: str, host: str = "127.0.0.1",
                 device: str | None = None, mooncake_port: int = 0,
                 protocol: str | None = None) -> None:
        if device is not None:
            host = interface_address(device)
        if host in ("", "0.0.0.0"):
            raise ValueError("the RDMA transport advertises its host in every handle: give "
                             "an address peers can reach (or a device), not a wildcard")
        self.address = address
        self.deployment_id = deployment_id
        self.protocol = engine_protocol(protocol)
        self.host = host
        self._engine = self._start(host, mooncake_port,
                                   device if self.protocol == "tcp" else None)
        self.session = f"{host}:{self._engine.get_rpc_port()}"
        self._pool = RegisteredPool(self._engine)
        self._items: dict[int, _Item] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def _start(self, host: str, port: int, device: str | None):
        if not 0 <= port < MAX_PORT:
            raise ValueError(f"--mooncake-port {port}: Mooncake listens below {MAX_PORT + 1} "
                             f"(it ignores higher ports); give 1..{MAX_PORT - 1}, or 0")
        engine = _engine_class(port)()
        if port and _ports != (port, port + 1):
            raise RuntimeError(f"--mooncake-port {port}: Mooncake reads its ports once per "
                               f"process, and this one has {_ports or 'its default range'}")
        if _ports is not None:
            # Mooncake picks its ports in that range (its TCP data listener on every
            # interface) and crashes when both are taken: check first, so that a port in
            # use is an error that names it
            for taken in _ports:
                if not port_free(taken):
                    raise OSError(f"--mooncake-port {_ports[0]}: port {taken} is in use "
                                  "(pass 0 to let Mooncake pick)")
        status = engine.initialize(host, "P2PHANDSHAKE", self.protocol, device or "")
        if status != 0:
            raise RuntimeError(f"Mooncake's transfer engine did not start on {host} "
                               f"({self.protocol}, status {status})")
        return engine

    # -- the sender's side ----------------------------------------------------------------
    def put(self, tensor: torch.Tensor, request_id: str, owner: str | None = None) -> Handle:
        owner = owner or self.address
        nbytes = tensor_nbytes(tensor)
        if nbytes <= INLINE_MAX:
            return inline_handle(tensor, owner, request_id)
        with self._lock:
            self._open_engine()
            self._reclaim()
            piece = self._pool.take(HEADER + nbytes)
            item, self._next_id = self._next_id, self._next_id + 1
            region = piece.view(self._pool)
            # the header before the item is listed: `_reclaim` must never see a done word
            # left by the slice's previous bytes
            region[:HEADER].view(torch.int64).copy_(torch.tensor([item, 0]))
            self._items[item] = _Item(request_id, owner, piece)
        region[HEADER:HEADER + nbytes].copy_(host_bytes(tensor))
        return make_handle(tensor, f"{self.session}/{item}@{self._pool.address(piece)}",
                           owner, request_id)

    def free_request(self, request_id: str) -> None:
        """Forget the request's stored tensors addressed to this component (the others are
        their receivers' to free)."""
        with self._lock:
            for item in [i for i, it in self._items.items()
                         if it.request_id == request_id and it.owner == self.address]:
                self._drop(item)

    def live_handles(self) -> int:
        """Tensors in this instance's pool not yet freed by their receivers."""
        with self._lock:
            self._reclaim()
            return len(self._items)

    def pool_bytes(self) -> tuple[int, int]:
        """(in use, registered) bytes of the pool: in use are stored tensors and reads
        under way."""
        with self._lock:
            return self._pool.used(), self._pool.capacity()

    def _reclaim(self) -> None:
        """Give back the slices whose receiver wrote their id into the done word."""
        for item in [i for i, it in self._items.items()
                     if int(it.piece.view(self._pool)[8:HEADER].view(torch.int64)) == i]:
            self._drop(item)

    def _drop(self, item: int) -> None:
        """Forget an item: its header no longer names it (a late read is refused)."""
        piece = self._items.pop(item).piece
        piece.view(self._pool)[:8].view(torch.int64).fill_(0)
        self._pool.give(piece)

    # -- the receiver's side --------------------------------------------------------------
    def get(self, handle: Handle) -> torch.Tensor:
        if handle.inline is not None:
            return inline_tensor(handle)
        session, item, remote = _parse(handle)
        nbytes = handle_nbytes(handle)
        with self._lock:
            engine = self._open_engine()
            piece = self._pool.take(HEADER + nbytes)
            region = piece.view(self._pool)
        try:
            status = engine.transfer_sync_read(session, self._pool.address(piece), remote,
                                               HEADER + nbytes)
            if status != 0:
                raise ConnectionError(f"cannot reach {session} for tensor {handle.key} of "
                                      f"request {handle.request_id} (Mooncake {self.protocol} "
                                      f"status {status}): the sender is gone, or the "
                                      "address is not its")
            item_id, done = region[:HEADER].view(torch.int64).tolist()
            if item_id != item or done == item:
                raise KeyError(f"tensor {handle.key} of request {handle.request_id} is gone "
                               "(freed, or never stored)")
            data = region[HEADER:HEADER + nbytes].clone()
        finally:
            with self._lock:
                self._pool.give(piece)
        return from_host_bytes(data, handle)

    def free(self, handle: Handle) -> None:
        """Mark the tensor done in the sender's header. A sender that is gone took its
        memory with it, so an unreachable one is not an error."""
        if handle.inline is not None:
            return
        session, item, remote = _parse(handle)
        with self._lock:
            engine = self._open_engine()
            piece = self._pool.take(8)
            piece.view(self._pool)[:8].view(torch.int64)[0] = item
        try:
            engine.transfer_sync_write(session, self._pool.address(piece), remote + 8, 8)
        finally:
            with self._lock:
                self._pool.give(piece)

    def _open_engine(self):
        if self._engine is None:
            raise ConnectionError("this transport is closed")
        return self._engine

    def close(self) -> None:
        """Forget the stored tensors, unregister the pool and drop the engine (which stops
        its listeners)."""
        with self._lock:
            if self._engine is None:
                return
            self._items.clear()
            self._pool.close()
            self._engine = None


def _parse(handle: Handle) -> tuple[str, int, int]:
    """(session, item id, remote address) of a handle's key."""
    session, _, rest = handle.key.rpartition("/")
    item, _, remote = rest.partition("@")
    if not session or not item.isdigit() or not remote.isdigit():
        raise ValueError(f"{handle.key!r} is not an RDMA transport key "
                         "(host:port/id@address)")
    return session, int(item), int(remote)


def port_free(port: int) -> bool:
    """Whether `port` is free on every interface (where Mooncake binds its listeners)."""
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True
