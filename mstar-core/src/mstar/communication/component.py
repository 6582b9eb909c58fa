"""What the frontend, the conductor and the workers share: a receive loop that runs on its
own thread in one process (or as a process's main loop when served)."""

from __future__ import annotations

import threading


class Component:
    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """The loop: until `stopping`, receive and handle messages."""
        raise NotImplementedError

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
