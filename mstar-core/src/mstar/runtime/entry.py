"""What every entry of a deployment keeps: the in-process `Frontend` (`mstar.load`) and a
served deployment's `Gateway` both take requests in and get the workers' reports back.

Both count the requests they serve (what admission compares to its limit), refuse a request
id still in use or used among the last `REMEMBERED_IDS` (a client retrying must not get
someone else's answer), and collect each worker's `WorkerReady` (readiness, start-up
errors) and latest `WorkerStats` (`/health`, `/metrics`).
"""

from __future__ import annotations

import collections
import threading
from typing import Any

from mstar.communication import messages as msg
from mstar.communication.component import Component
from mstar.errors import RequestError

#: How many finished request ids an entry remembers to refuse their reuse.
REMEMBERED_IDS = 10_000


class Entry(Component):
    """Subclasses keep their own value per live request in `_live` (under `_lock`), call
    `_claim` when one starts and hand worker reports to `_on_report`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.expected_workers: set[str] = set()  # whose WorkerReady readiness waits for
        self.ready_workers: set[str] = set()  # reported in, started or not
        self.startup_errors: dict[str, str] = {}
        self.worker_stats: dict[str, msg.WorkerStats] = {}
        self.ready = threading.Event()
        self._live: dict[str, Any] = {}
        self._used: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def live_requests(self) -> int:
        with self._lock:
            return len(self._live)

    def is_live(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._live

    def _claim(self, request_id: str) -> None:
        """Take `request_id` for a new request (the caller holds `_lock`)."""
        if request_id in self._live or request_id in self._used:
            raise RequestError(f"request id {request_id!r} is already in use; request ids "
                               "must be unique", param="request_id")
        self._used[request_id] = None
        while len(self._used) > REMEMBERED_IDS:
            self._used.popitem(last=False)

    def _on_report(self, m: msg.Message) -> bool:
        """Take `m` if it is a worker's report (True), else leave it to the caller."""
        if isinstance(m, msg.WorkerStats):
            self.worker_stats[m.address] = m
        elif isinstance(m, msg.WorkerReady):
            self.ready_workers.add(m.address)
            if m.error is not None:
                self.startup_errors[m.address] = m.error
            if self.expected_workers <= self.ready_workers:
                self.ready.set()
        else:
            return False
        return True


__all__ = ["REMEMBERED_IDS", "Entry"]
