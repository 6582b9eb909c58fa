"""The link between node 0 and each other node of a multi-node deployment.

Node 0 (API server, gateway, conductor, data workers, its own ranks) listens at
`--master-addr:--master-port`; every other node's agent (`mstar.serving.agent`) connects,
says who it is (`Hello`: node rank, `--nnodes`, the digest of what it would serve) and is
refused at once, with a message naming the difference, when it does not belong. Once every
node has joined, node 0 knows each node's address and sends each a `Welcome` with the
deployment's control endpoints (ZMQ `tcp://`) and its ranks. The link then stays open:
the agent reports its children's deaths (`ChildDied`) and sends a `Heartbeat` every
`HEARTBEAT_S` (from its `Hello` on, so a node waiting for the others is watched too); a
closed link or `HEARTBEAT_TIMEOUT_S` of silence is the node lost. Node 0
ends the deployment with `Stop` (the exit status the agent should end with).

A plain TCP socket rather than ZMQ: its end is an event (the agent's process exits, the
kernel closes the connection), which is what node health needs. Messages are msgspec JSON,
one per line.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

log = logging.getLogger("mstar.serving")

#: Seconds between an agent's heartbeats, and of silence after which node 0 counts the
#: node as lost (a frozen machine or a cut network never closes the connection).
HEARTBEAT_S = 1.0
HEARTBEAT_TIMEOUT_S = 10.0


class Hello(msgspec.Struct, tag=True):
    """agent -> node 0: who joins. `identity`: what must be the same on every node (the
    model, preset, load format and the deployment config), `digest` its hash."""

    node_rank: int
    nnodes: int
    host: str
    identity: dict
    digest: str


class Welcome(msgspec.Struct, tag=True):
    """node 0 -> agent: start your ranks' workers with these."""

    deployment_id: str
    protocol: str
    ranks: list[int]
    endpoints: dict[str, str]
    tp_port: int
    tp_host: str


class Refused(msgspec.Struct, tag=True):
    reason: str


class Heartbeat(msgspec.Struct, tag=True):
    pass


class ChildDied(msgspec.Struct, tag=True):
    address: str
    message: str


class Stop(msgspec.Struct, tag=True):
    code: int


LinkMessage = Hello | Welcome | Refused | Heartbeat | ChildDied | Stop
_decoder = msgspec.json.Decoder(LinkMessage)


def send(sock: socket.socket, message: LinkMessage) -> None:
    sock.sendall(msgspec.json.encode(message) + b"\n")


def receive(reader: Any) -> LinkMessage | None:
    """The next message from `reader` (a socket's binary file), None at the link's end."""
    line = reader.readline()
    return _decoder.decode(line) if line else None


def identity(config: Mapping[str, Any], *, model: str, preset: str | None,
             load_format: str) -> tuple[dict, str]:
    """What every node must agree on, and its digest (sha256 of canonical JSON)."""
    data = {"model": model, "preset": preset, "load_format": load_format,
            "config": dict(config)}
    digest = hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()
    return data, digest


def refusal(hello: Hello, *, nnodes: int, identity: Mapping[str, Any], digest: str,
            joined: Mapping[int, str]) -> str | None:
    """Why node 0 refuses `hello` (naming the difference), or None: it may join.
    `joined`: node rank -> host of the nodes already in."""
    k = hello.node_rank
    if hello.nnodes != nnodes:
        return f"--nnodes differs: node 0 runs {nnodes} node(s), node {k} says {hello.nnodes}"
    if not 0 < k < nnodes:
        return (f"--node-rank {k} cannot join: nodes 1..{nnodes - 1} join node 0 "
                f"(--nnodes {nnodes})")
    if hello.digest != digest:
        mine, theirs = identity, hello.identity
        for key in ("model", "preset", "load_format"):
            if mine.get(key) != theirs.get(key):
                return (f"{key} differs: node 0 has {mine.get(key)!r}, node {k} has "
                        f"{theirs.get(key)!r}")
        ours, other = mine.get("config", {}), theirs.get("config", {})
        fields = sorted(f for f in set(ours) | set(other) if ours.get(f) != other.get(f))
        shown = "; ".join(f"{f} (node 0: {ours.get(f)!r}, node {k}: {other.get(f)!r})"
                          for f in fields[:3])
        return f"the deployment config differs from node 0's: {shown or 'digest only'}"
    if k in joined:
        return f"node rank {k} has already joined (from {joined[k]})"
    return None


class NodeLinks:
    """Node 0's end of every link: accepts and checks the other nodes, welcomes them once
    all have joined, then watches them. `on_lost(k, message)` runs (on a link's thread)
    when node k's link ends or falls silent, `on_child_died(address, message)` when its
    agent reports a dead worker; neither after `stop`."""

    def __init__(self, host: str, port: int, *, nnodes: int, identity: Mapping[str, Any],
                 digest: str, on_lost: Callable[[int, str], None],
                 on_child_died: Callable[[str, str], None]) -> None:
        self.nnodes = nnodes
        self._identity, self._digest = identity, digest
        self._on_lost, self._on_child_died = on_lost, on_child_died
        self._lock = threading.Lock()
        self._joined: dict[int, tuple[socket.socket, str]] = {}  # node -> (link, host)
        self._all_joined = threading.Event()
        self._stopping = False
        self._listener = socket.create_server((host, port))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="node-links", daemon=True).start()

    def hosts(self) -> dict[int, str]:
        with self._lock:
            return {k: host for k, (_, host) in self._joined.items()}

    def wait_joined(self, timeout: float, cancelled: Callable[[], bool]) -> list[int]:
        """Wait until every node joined (or `timeout`, or `cancelled()`); the node ranks
        still missing."""
        deadline = time.monotonic() + timeout
        while not self._all_joined.wait(0.1):
            if cancelled() or time.monotonic() > deadline:
                break
        with self._lock:
            return [k for k in range(1, self.nnodes) if k not in self._joined]

    def welcome(self, k: int, message: Welcome) -> None:
        with self._lock:
            link = self._joined[k][0]
        send(link, message)

    def stop(self, code: int) -> None:
        """Tell every node to stop (exiting with `code`) and close the links."""
        with self._lock:
            self._stopping = True
            links = [link for link, _ in self._joined.values()]
        for link in links:
            try:
                send(link, Stop(code))
                link.shutdown(socket.SHUT_RDWR)  # the link's reader may still hold it
            except OSError:
                pass  # already gone
            link.close()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                link, peer = self._listener.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._serve, args=(link,), daemon=True,
                             name=f"node-link-{peer[0]}").start()

    def _serve(self, link: socket.socket) -> None:
        link.settimeout(HEARTBEAT_TIMEOUT_S)  # silence means the node is lost
        reader = link.makefile("rb")
        k, why = None, "its link closed"
        try:
            hello = receive(reader)
            if not isinstance(hello, Hello):
                link.close()
                return
            with self._lock:
                joined = {n: host for n, (_, host) in self._joined.items()}
                reason = None if self._stopping else refusal(
                    hello, nnodes=self.nnodes, identity=self._identity, digest=self._digest,
                    joined=joined)
                if reason is None and not self._stopping:
                    k = hello.node_rank
                    self._joined[k] = (link, hello.host)
                    if len(self._joined) == self.nnodes - 1:
                        self._all_joined.set()
            if k is None:
                log.error("refused a node: %s", reason)
                send(link, Refused(reason or "the deployment is stopping"))
                link.close()
                return
            log.info("node %d (%s) joined", k, hello.host)
            while (m := receive(reader)) is not None:
                if isinstance(m, ChildDied):
                    self._on_child_died(m.address, m.message)
        except TimeoutError:
            why = f"it sent no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s"
        except (OSError, msgspec.DecodeError) as exc:
            why = f"its link failed ({exc})"
        if k is None:
            return
        with self._lock:
            if self._stopping:
                return
            host = self._joined[k][1]
            if not self._all_joined.is_set():  # left before the start: it may join again
                del self._joined[k]
                log.warning("node %d (%s) left before the deployment started", k, host)
                return
        self._on_lost(k, f"node {k} ({host}) is gone: {why}")


def control_endpoints(hosts: Mapping[str, str], first_port: int) -> dict[str, str]:
    """`tcp://host:port` of every component address, ports counted from `first_port` in
    the order given (node 0 makes the map and sends it to the others: they derive none)."""
    return {address: f"tcp://{host}:{first_port + i}" for i, (address, host)
            in enumerate(hosts.items())}

