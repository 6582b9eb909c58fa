"""Peer-to-peer weights: a rank that needs a node's weights takes them from a running rank
that already holds them (same model, checkpoint, revision, node and sharding) over the
tensor transport, instead of reading disk or the hub.

Serving (`WeightService`): every served worker with `--weights-from-peers` runs a ZMQ REP
socket on its node's address, in a thread of its own. A socket of its own, not a message
on the worker's channel: the asker is not part of the deployment (another deployment, a
restarted worker, a second node), the channel's addresses and message types are the
deployment's, and the worker's loop is busy stepping engines while the thread answers.
A request names a `WeightKey`; the reply is the node's manifest (name, dtype, shape of
every parameter and persistent buffer, tied ones once). The asker then fetches batches:
the service puts each tensor in the worker's own transport under a weights scope
(`communication.transport.weights_scope`, never a request id, so no request's end frees
it) and replies the handles with a blake2b checksum per tensor, computed the first time
the tensor is served and kept (a tensor whose memory changed since, or bytes damaged on
the way, fail at the asker). `close`, or a session idle for `SESSION_IDLE`, frees what
the scope still holds.

Finding peers (`PeerRegistry`): a SQLite table `<cache dir>/.mstar/peers.sqlite`, a file
of its own beside the cache index, keyed by the `WeightKey`, with the endpoint, host and
pid. An entry whose pid is gone (same host) is deleted when looked up; a worker removes
its entries when it stops.

Asking (`load_from_peer`): the asker checks the manifest against its module (names and
shapes), fetches, verifies every checksum on arrival and feeds `load_weights` (the
tensors are already this rank's shard in its dtype, so they load as tp_size 1). Any
failure (no live peer, a peer that died or went silent mid-stream, a checksum or shape
mismatch) returns None with a log line and the caller reads disk or the hub.

Off by default (`--weights-from-peers`, `MSTAR_WEIGHTS_FROM_PEERS`): the service hands a
node's weights to anyone who can reach the worker's address, and the registry trusts that
a checkpoint path or revision names the same files for as long as its peer runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import torch
from torch import nn

from mstar.communication.messages import Handle
from mstar.communication.tensor_bytes import host_bytes
from mstar.communication.transport import Transport, weights_scope
from mstar.weights.cache import WeightCache, WeightsError, resolve_cache_dir
from mstar.weights.index import pid_alive
from mstar.weights.loader import load_weights
from mstar.weights.sources import is_hub_repo
from mstar.weights.spec import WeightSpec

log = logging.getLogger(__name__)

#: Seconds a live peer may stay silent before the asker gives up on it.
PEER_TIMEOUT = 60.0
#: Seconds a session may go untouched before its service frees what it holds.
SESSION_IDLE = 120.0
#: Bytes an asker fetches per request (what the transport holds at once per asker).
BATCH_BYTES = 256 << 20
_POLL_MS = 100


class PeerError(RuntimeError):
    """A peer could not deliver the weights; the caller falls back to disk or the hub."""


@dataclass(frozen=True)
class WeightKey:
    """What identifies a node's weights on one rank: the model, where its checkpoint is
    (hub repo id or absolute path), the revision (a commit, `local` for a path), the graph
    node, the rank's shard and the dtype."""

    model: str
    source: str
    revision: str
    node: str
    tp_rank: int
    tp_size: int
    dtype: str

    def scope(self, session: str) -> str:
        return weights_scope(f"{self.model}@{self.revision}/{self.node}/"
                             f"{self.tp_rank}of{self.tp_size}#{session}")


def source_revision(location: str, revision: str | None, cache_dir: str | None) -> str:
    """The revision a key names: `local` for a checkpoint path (or a URL's file), else
    the commit the hub cache's ref names (offline), else `revision` as given (default
    `main`)."""
    if not is_hub_repo(location):
        return "local"
    try:
        return WeightCache(cache_dir).cached_commit(location, revision)
    except WeightsError:
        return revision or "main"


def registry_dir(cache_dir: str | None) -> Path:
    """`<cache dir>/.mstar`, the cache directory resolved as everywhere else."""
    return resolve_cache_dir(cache_dir) / ".mstar"


class PeerRegistry:
    """Which running ranks serve which weights (see the module docstring)."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / "peers.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS peers (model TEXT, source TEXT, "
                       "revision TEXT, node TEXT, tp_rank INT, tp_size INT, dtype TEXT, "
                       "endpoint TEXT, host TEXT, pid INT, started REAL)")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def add(self, key: WeightKey, endpoint: str) -> None:
        with self._db() as db:
            db.execute("INSERT INTO peers VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (*asdict(key).values(), endpoint, socket.gethostname(), os.getpid(),
                        time.time()))

    def remove(self, endpoint: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM peers WHERE endpoint = ?", (endpoint,))

    def find(self, key: WeightKey) -> list[tuple[str, str, int]]:
        """Live peers of `key`, newest first: (endpoint, host, pid). Entries of this
        host whose process is gone are deleted."""
        names = list(asdict(key))
        with self._db() as db:
            rows = db.execute(
                "SELECT endpoint, host, pid FROM peers WHERE "
                + " AND ".join(f"{n} = ?" for n in names) + " ORDER BY started DESC",
                tuple(asdict(key).values())).fetchall()
            here = socket.gethostname()
            dead = [r for r in rows if r[1] == here and not pid_alive(r[2])]
            for endpoint, _, _ in dead:
                db.execute("DELETE FROM peers WHERE endpoint = ?", (endpoint,))
        return [r for r in rows if r not in dead]


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(host_bytes(tensor).numpy(), digest_size=16).hexdigest()


def served_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What a module's weights are: its parameters and persistent buffers by name, a
    tensor shared under several names (tied embeddings) under its first."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor.detach()
    return out


class _Request(msgspec.Struct, tag_field="op", tag=str.lower):
    pass


class Manifest(_Request):
    key: dict


class Fetch(_Request):
    session: str
    names: list[str]


class Close(_Request):
    session: str


_REQUESTS = Manifest | Fetch | Close


class _Session(msgspec.Struct):
    key: WeightKey
    scope: str
    touched: float


class WeightService:
    """One worker's weights for its peers (see the module docstring). `transport`: the
    worker's tensor transport; `protocol` and `deployment_id` tell an asker how to read
    it."""

    def __init__(self, transport: Transport, *, protocol: str, deployment_id: str,
                 host: str, registry: PeerRegistry) -> None:
        import zmq

        self.transport, self.protocol, self.deployment_id = transport, protocol, deployment_id
        self.registry = registry
        self._nodes: dict[WeightKey, dict[str, torch.Tensor]] = {}
        self._sums: dict[tuple[WeightKey, str], str] = {}
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socket = zmq.Context.instance().socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=f"weights-{transport.address}")
        self._thread.start()

    def publish(self, key: WeightKey, module: nn.Module) -> None:
        """Serve `module`'s weights under `key` from now on."""
        with self._lock:
            self._nodes[key] = served_tensors(module)
        try:
            self.registry.add(key, self.endpoint)
        except sqlite3.Error as exc:  # the rank serves requests all the same
            log.warning("weights of node %s not offered to peers: %s", key.node, exc)

    def _serve(self) -> None:
        import zmq

        decoder = msgspec.json.Decoder(_REQUESTS)
        while not self._stop.is_set():
            try:
                if not self._socket.poll(_POLL_MS):
                    self._expire()
                    continue
                raw = self._socket.recv()
            except zmq.ZMQError:
                return  # closed
            try:
                reply = self._answer(decoder.decode(raw))
            except Exception as exc:  # an asker's bad request must not stop the service
                log.warning("weights service %s: %s", self.endpoint, exc)
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                self._socket.send(msgspec.json.encode(reply))
            except zmq.ZMQError:
                return

    def _answer(self, req: _Request) -> dict:
        if isinstance(req, Manifest):
            key = WeightKey(**req.key)
            with self._lock:
                tensors = self._nodes.get(key)
            if tensors is None:
                return {"error": f"no weights of {key} here"}
            session = uuid.uuid4().hex
            self._sessions[session] = _Session(key, key.scope(session), time.monotonic())
            return {"session": session, "protocol": self.protocol,
                    "deployment_id": self.deployment_id,
                    "tensors": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)]
                                for n, t in tensors.items()]}
        state = self._sessions.get(req.session)
        if state is None:
            return {"error": f"unknown or expired session {req.session}"}
        if isinstance(req, Close):
            del self._sessions[req.session]
            self.transport.free_request(state.scope)
            return {}
        state.touched = time.monotonic()
        tensors = self._nodes[state.key]
        out = []
        for name in req.names:
            tensor = tensors[name]
            checksum = self._sums.get((state.key, name))
            if checksum is None:
                checksum = self._sums[(state.key, name)] = _checksum(tensor)
            handle = self.transport.put(tensor, state.scope)
            out.append({"name": name, "handle": msgspec.to_builtins(handle),
                        "checksum": checksum})
        return {"tensors": out}

    def _expire(self) -> None:
        now = time.monotonic()
        for session, state in list(self._sessions.items()):
            if now - state.touched > SESSION_IDLE:
                del self._sessions[session]
                self.transport.free_request(state.scope)

    def close(self) -> None:
        """Stop answering and leave the registry (held handles go with the transport)."""
        with contextlib.suppress(sqlite3.Error):
            self.registry.remove(self.endpoint)
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()


class _Peer:
    """The asker's side of one session with one peer: a REQ socket that gives up when
    the peer's process is gone (same host) or silent for `timeout`."""

    def __init__(self, endpoint: str, host: str, pid: int, timeout: float) -> None:
        import zmq

        self.endpoint, self.pid, self.timeout = endpoint, pid, timeout
        self.local = host == socket.gethostname()
        self.socket = zmq.Context.instance().socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.answering = True  # False once a request went unanswered: ask no more

    def ask(self, request: _Request) -> dict:
        self.socket.send(msgspec.json.encode(request))
        deadline = time.monotonic() + self.timeout
        while not self.socket.poll(_POLL_MS):
            if self.local and not pid_alive(self.pid):
                self.answering = False
                raise PeerError(f"peer {self.endpoint} (pid {self.pid}) died")
            if time.monotonic() > deadline:
                self.answering = False
                raise PeerError(f"peer {self.endpoint} silent for {self.timeout:.0f} s")
        reply = msgspec.json.decode(self.socket.recv())
        if "error" in reply:
            raise PeerError(f"peer {self.endpoint}: {reply['error']}")
        return reply

    def close(self) -> None:
        self.socket.close()


def stream_from_peer(module: nn.Module, key: WeightKey, endpoint: str, host: str, pid: int,
                     *, timeout: float = PEER_TIMEOUT, batch_bytes: int = BATCH_BYTES
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """`module`'s weights from one peer, as (name, tensor) checked against `module` and
    against each tensor's checksum; raises `PeerError` when it cannot."""
    peer = _Peer(endpoint, host, pid, timeout)
    try:
        manifest = peer.ask(Manifest(asdict(key)))
        want = {n: (str(t.dtype).removeprefix("torch."), list(t.shape))
                for n, t in served_tensors(module).items()}
        have = {n: (dtype, shape) for n, dtype, shape in manifest["tensors"]}
        if have != want:
            differ = sorted(n for n in want.keys() | have.keys() if want.get(n) != have.get(n))
            raise PeerError(f"peer {endpoint} holds other tensors: {differ[:5]}")
        session = manifest["session"]
        reader = _reader(manifest["protocol"], manifest["deployment_id"])
        try:
            for names in _batches(want, batch_bytes):
                for item in peer.ask(Fetch(session, names))["tensors"]:
                    handle = msgspec.convert(item["handle"], Handle)
                    try:
                        tensor = reader.get(handle)
                    except (KeyError, OSError, ValueError) as exc:
                        raise PeerError(f"peer {endpoint}: {exc}") from exc
                    finally:
                        reader.free(handle)
                    if _checksum(tensor) != item["checksum"]:
                        raise PeerError(f"peer {endpoint}: checksum mismatch on "
                                        f"{item['name']}")
                    yield item["name"], tensor
        finally:  # done or not, the peer frees what the session still holds
            if peer.answering:
                with contextlib.suppress(PeerError):
                    peer.ask(Close(session))
            close = getattr(reader, "close", None)
            if close is not None:
                close()
    finally:
        peer.close()


def _reader(protocol: str, deployment_id: str) -> Transport:
    """A transport of the peer's kind that only reads (and frees) the peer's handles."""
    from mstar.plugins import transport_registry
    from mstar.plugins.registry import import_string

    cls = import_string(transport_registry().get(protocol).transport_class)
    return cls(f"weights-reader-{os.getpid()}", deployment_id=deployment_id,
               host="127.0.0.1", device=None)


def _batches(want: dict[str, tuple[str, list[int]]], batch_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for name, (dtype, shape) in want.items():
        nbytes = getattr(torch, dtype).itemsize * int(torch.Size(shape).numel())
        if batch and size + nbytes > batch_bytes:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


def load_from_peer(module: nn.Module, key: WeightKey, cache_dir: str | None, *,
                   timeout: float = PEER_TIMEOUT) -> list[str] | None:
    """Load `module` (allocated, not yet filled) from the first live peer of `key` in the
    registry of `cache_dir` that delivers: the names it filled, or None (logged) when no
    peer did."""
    try:
        peers = PeerRegistry(registry_dir(cache_dir)).find(key)
    except (OSError, sqlite3.Error) as exc:
        log.warning("no weights from peers for node %s: the peer registry under %s: %s",
                    key.node, registry_dir(cache_dir), exc)
        return None
    for endpoint, host, pid in peers:
        started, received = time.perf_counter(), 0

        def counted(stream: Iterator[tuple[str, torch.Tensor]]):
            nonlocal received
            for name, tensor in stream:
                received += tensor.numel() * tensor.element_size()
                yield name, tensor

        try:
            loaded = load_weights(module, counted(stream_from_peer(
                module, key, endpoint, host, pid, timeout=timeout)), WeightSpec()).loaded
        except (PeerError, ValueError) as exc:
            log.warning("weights of node %s (rank %d/%d) from peer failed, %s; reading "
                        "them from the checkpoint instead", key.node, key.tp_rank,
                        key.tp_size, exc)
            continue
        log.info("weights of node %s (tp %d/%d): %d bytes from peer %s (pid %d) in %.2f s",
                 key.node, key.tp_rank, key.tp_size, received, endpoint, pid,
                 time.perf_counter() - started)
        return loaded
    return None
