"""What the frontend, the conductor and the workers share: a receive loop that runs on its
own thread in one process (or as a process's main loop when served)."""

from __future__ import annotations

import logging
import threading

from mstar.communication.channel import Channel
from mstar.communication.messages import Message

log = logging.getLogger(__name__)


class Component:
    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    channel: Channel

    def run(self) -> None:
        """Until `stopping`: handle each message (a failing one is logged, never fatal to
        the loop) and `tick()` between them."""
        while not self.stopping:
            m = self.channel.recv(timeout=0.05)
            if m is not None:
                try:
                    self.handle(m)
                except Exception:
                    log.exception("%s failed on %s", self.name, type(m).__name__)
            self.tick()

    def handle(self, m: Message) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        """Periodic work of the loop (deadlines); nothing by default."""

    def alive(self) -> bool:
        """The loop's thread is running (False before `start` and after it ended)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop_soon(self) -> None:
        """Leave the loop at its next turn (from inside it, e.g. on Shutdown)."""
        self._stop.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
