"""The TCP tensor transport: the receiver pulls tensors from the sender over TCP.

`put` keeps the tensor in the sender's memory and returns a handle whose key says where it
is: `"<host>:<port>/<id>"`. Every instance runs one small server (a listening thread and a
thread per connected peer) answering two requests, `GET id` (the raw bytes) and `DROP id`
(forget it). `get` fetches over one connection per peer, reused and serialised by a lock;
`free` sends DROP. Pulling means nothing travels for a handle never read, and the memory
stays with the component that made the tensor until the receiver is done with it. Tensors
of at most `INLINE_MAX` bytes travel inside the handle instead.

Wire format (network byte order): a request is `op:u8 id:u64`; a reply is
`status:u8 length:u64` followed, for a found GET, by `length` bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
from collections.abc import Callable

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

_REQUEST = struct.Struct("!BQ")
_REPLY = struct.Struct("!BQ")
_GET, _DROP = 1, 2
_FOUND, _UNKNOWN = 0, 1
CONNECT_TIMEOUT = 10.0
#: A peer silent this long in the middle of a request counts as gone.
IO_TIMEOUT = 60.0
_SIOCGIFADDR = 0x8915


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux), e.g. "eth0" -> "10.0.0.5"."""
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            packed = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR,
                                 struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            names = ", ".join(n for _, n in socket.if_nameindex())
            raise ValueError(f"network interface {name!r} has no IPv4 address "
                             f"({exc.strerror}); interfaces: {names}") from exc
    return socket.inet_ntoa(packed[20:24])


class TcpTransport:
    """Tensors pulled over TCP from the sender's in-memory store.

    `put` keeps a reference, not a copy, of a contiguous CPU tensor: as with
    `LocalTransport`, a sender never modifies a tensor after handing it over. `host` (or
    the IPv4 address of interface `device`) is both where the server listens and what
    handles advertise, so it must be an address the peers can reach."""

    def __init__(self, address: str, *, deployment_id: str, host: str = "127.0.0.1",
                 device: str | None = None) -> None:
        if device is not None:
            host = interface_address(device)
        if host in ("", "0.0.0.0"):
            raise ValueError("the TCP transport advertises its host in every handle: give an "
                             "address peers can reach (or a device), not a wildcard")
        self.address = address
        self.deployment_id = deployment_id
        self._store: dict[int, tuple[str, str, torch.Tensor]] = {}  # id -> (rid, owner, bytes)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._peers: dict[str, _Connection] = {}
        self._served: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener = socket.create_server((host, 0))
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._spawn(self._accept_loop, "accept")

    # -- the sender's side ----------------------------------------------------------------
    def put(self, tensor: torch.Tensor, request_id: str, owner: str | None = None) -> Handle:
        owner = owner or self.address
        if tensor_nbytes(tensor) <= INLINE_MAX:
            return inline_handle(tensor, owner, request_id)
        data = host_bytes(tensor)
        with self._lock:
            item = next(self._ids)
            self._store[item] = (request_id, owner, data)
        return make_handle(tensor, f"{self.host}:{self.port}/{item}", owner, request_id)

    def free_request(self, request_id: str) -> None:
        """Forget the request's stored tensors addressed to this component (the others are
        their receivers' to free: a receiver frees what arrives after it dropped the
        request)."""
        with self._lock:
            for item in [i for i, (rid, owner, _) in self._store.items()
                         if rid == request_id and owner == self.address]:
                del self._store[item]

    def live_handles(self) -> int:
        """Tensors in this instance's store."""
        with self._lock:
            return len(self._store)

    # -- the receiver's side --------------------------------------------------------------
    def get(self, handle: Handle) -> torch.Tensor:
        if handle.inline is not None:
            return inline_tensor(handle)
        nbytes = handle_nbytes(handle)
        status, length, data = self._request(handle, _GET)
        if status == _UNKNOWN:
            raise KeyError(f"tensor {handle.key} of request {handle.request_id} is gone "
                           f"(freed, or never stored)")
        if length != nbytes:
            raise ValueError(f"tensor {handle.key} has {length} bytes; its handle "
                             f"({handle.dtype}{handle.shape}) needs {nbytes}")
        return from_host_bytes(data, handle)

    def free(self, handle: Handle) -> None:
        """Tell the sender to forget the tensor. A sender that is gone took its store with
        it, so an unreachable one is not an error."""
        if handle.inline is not None:
            return
        with contextlib.suppress(ConnectionError):
            self._request(handle, _DROP)

    def _request(self, handle: Handle, op: int) -> tuple[int, int, torch.Tensor | None]:
        peer, _, item = handle.key.rpartition("/")
        if not peer or not item.isdigit():
            raise ValueError(f"{handle.key!r} is not a TCP transport key (host:port/id)")
        try:
            conn = self._connection(peer)
            with conn.lock:
                try:
                    return conn.request(op, int(item))
                except OSError:
                    self._forget(peer, conn)  # the stream is out of step: never reuse it
                    raise
        except OSError as exc:
            raise ConnectionError(f"cannot reach {peer} for tensor {handle.key} of request "
                                  f"{handle.request_id}: {exc}") from exc

    def _connection(self, peer: str) -> _Connection:
        with self._lock:
            conn = self._peers.get(peer)
        if conn is not None:
            return conn
        host, _, port = peer.rpartition(":")
        conn = _Connection(host, int(port))  # outside the lock: other peers never wait
        with self._lock:
            if self._closed:
                conn.close()
                raise ConnectionError("this transport is closed")
            kept = self._peers.setdefault(peer, conn)
        if kept is not conn:
            conn.close()  # another thread connected first
        return kept

    def _forget(self, peer: str, conn: _Connection) -> None:
        with self._lock:
            if self._peers.get(peer) is conn:
                del self._peers[peer]
        conn.close()

    # -- the server -----------------------------------------------------------------------
    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name=f"tcp-transport-{self.address}-{name}")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                self._served.add(sock)
                self._threads = [t for t in self._threads if t.is_alive()]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve, "peer", sock)

    def _serve(self, sock: socket.socket) -> None:
        header = bytearray(_REQUEST.size)
        try:
            while True:
                _recv_exactly(sock, memoryview(header))
                op, item = _REQUEST.unpack(header)
                if op == _GET:
                    with self._lock:
                        entry = self._store.get(item)
                    if entry is None:
                        sock.sendall(_REPLY.pack(_UNKNOWN, 0))
                    else:
                        payload = memoryview(entry[2].numpy())
                        _send_all(sock, _REPLY.pack(_FOUND, len(payload)), payload)
                elif op == _DROP:
                    with self._lock:
                        found = self._store.pop(item, None) is not None
                    sock.sendall(_REPLY.pack(_FOUND if found else _UNKNOWN, 0))
                else:
                    return  # not our protocol: hang up
        except OSError:
            return  # the peer hung up, or we are closing
        finally:
            with self._lock:
                self._served.discard(sock)
            sock.close()

    def close(self) -> None:
        """Stop the server, hang up every connection and forget the stored tensors."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            peers, self._peers = list(self._peers.values()), {}
            served = list(self._served)
            self._store.clear()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        for sock in served:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for conn in peers:
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)


class _Connection:
    """One client connection to a peer's server; callers hold `lock` around `request`."""

    def __init__(self, host: str, port: int) -> None:
        self.lock = threading.Lock()
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        self.sock.settimeout(IO_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reply = bytearray(_REPLY.size)

    def request(self, op: int, item: int) -> tuple[int, int, torch.Tensor | None]:
        """(status, length, the payload of a found GET)."""
        self.sock.sendall(_REQUEST.pack(op, item))
        _recv_exactly(self.sock, memoryview(self._reply))
        status, length = _REPLY.unpack(self._reply)
        if op != _GET or status != _FOUND:
            return status, length, None
        data = torch.empty(length, dtype=torch.uint8)
        _recv_exactly(self.sock, memoryview(data.numpy()))
        return status, length, data

    def close(self) -> None:
        self.sock.close()


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = sock.recv_into(view[done:])
        if not got:
            raise ConnectionError(f"connection closed after {done} of {len(view)} bytes")
        done += got


def _send_all(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Header and payload in one system call when the socket takes them (a small tensor
    then leaves in one segment), the rest with `sendall`."""
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    sock.sendall(payload[sent - len(header):])
