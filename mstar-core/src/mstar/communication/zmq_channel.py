"""Control channels between processes: ZMQ PUSH/PULL sockets carrying encoded messages.

Each component binds one PULL socket at its endpoint and pushes to others through PUSH
sockets connected on first use (ZMQ queues until the peer is up, so start order does not
matter). Endpoints are `ipc://<socket_path_prefix>/<address>.sock` on one node; an
`endpoints` map can point any address at `tcp://host:port` for multi-node deployments.
Only bytes cross: the same msgspec messages as the in-process hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import zmq

from mstar.communication import messages


def ipc_endpoint(prefix: str, address: str) -> str:
    safe = address.replace(":", "_").replace("/", "_")
    return f"ipc://{os.path.join(prefix, safe)}.sock"


class ZmqChannel:
    """One component's mailbox; `send` is thread-safe (the frontend sends from request
    threads), `recv` is for the component's own loop."""

    def __init__(self, address: str, *, prefix: str,
                 endpoints: Mapping[str, str] | None = None):
        self.address = address
        self._prefix = prefix
        self._endpoints = dict(endpoints or {})
        self._ctx = zmq.Context.instance()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.endpoint(address))
        self._push: dict[str, zmq.Socket] = {}
        self._lock = threading.Lock()
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)

    def endpoint(self, address: str) -> str:
        return self._endpoints.get(address) or ipc_endpoint(self._prefix, address)

    def send(self, dest: str, msg: messages.Message) -> None:
        data = messages.encode(msg)
        with self._lock:
            sock = self._push.get(dest)
            if sock is None:
                sock = self._ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(self.endpoint(dest))
                self._push[dest] = sock
            sock.send(data, copy=False)

    def recv(self, timeout: float | None = None) -> messages.Message | None:
        ms = None if timeout is None else int(timeout * 1000)
        if not self._poller.poll(ms):
            return None
        return messages.decode(self._pull.recv(copy=True))

    def close(self) -> None:
        with self._lock:
            for sock in self._push.values():
                sock.close()
            self._push.clear()
        self._pull.close()
