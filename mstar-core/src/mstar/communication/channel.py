"""Control channels: how components send each other encoded messages by address.

Addresses are strings: "conductor", "frontend", "worker:<rank>". A `Channel` is one
component's mailbox plus the ability to send to any other address. `InProcessHub` connects
components living in one process through queues; the ZMQ hub of the serving layer offers
the same interface across processes. Only bytes cross a channel.
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

from mstar.communication import messages


class Channel(Protocol):
    address: str

    def send(self, dest: str, msg: messages.Message) -> None: ...

    def recv(self, timeout: float | None = None) -> messages.Message | None:
        """The next message, or None after `timeout` seconds."""


class InProcessHub:
    """Mailboxes for components in one process; thread-safe."""

    def __init__(self) -> None:
        self._boxes: dict[str, queue.SimpleQueue[bytes]] = {}
        self._lock = threading.Lock()

    def channel(self, address: str) -> InProcessChannel:
        with self._lock:
            if address in self._boxes:
                raise ValueError(f"address {address!r} already has a channel")
            self._boxes[address] = queue.SimpleQueue()
        return InProcessChannel(self, address)

    def deliver(self, dest: str, data: bytes) -> None:
        box = self._boxes.get(dest)
        if box is None:
            raise KeyError(f"no component at address {dest!r}")
        box.put(data)

    def box(self, address: str) -> queue.SimpleQueue[bytes]:
        return self._boxes[address]


class InProcessChannel:
    def __init__(self, hub: InProcessHub, address: str):
        self.address = address
        self._hub = hub
        self._box = hub.box(address)

    def send(self, dest: str, msg: messages.Message) -> None:
        self._hub.deliver(dest, messages.encode(msg))

    def recv(self, timeout: float | None = None) -> messages.Message | None:
        try:
            data = self._box.get(timeout=timeout) if timeout != 0 else self._box.get_nowait()
        except queue.Empty:
            return None
        return messages.decode(data)
