"""The gateway: the API server's side of a served deployment.

The model's code (`process_prompt`: tokenising, media decoding; `postprocess`:
detokenising) runs in data-worker processes, each a `Frontend` at "frontend:<k>", so this
process only does HTTP. The gateway (address "api") hands each request body to the data
worker with the fewest live requests (ties to the lowest index) as a `ClientRequest`, and
passes the `ClientEvent`s that come back to the request's sink; bad input arrives that way
too, as a 400 `Error` event. It also collects what the app needs to answer `/health` and
`/metrics`: every worker's and data worker's `WorkerReady` and the workers' `WorkerStats`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from mstar import events
from mstar.communication import messages as msg
from mstar.communication.channel import Channel
from mstar.errors import RequestError
from mstar.events import Sink
from mstar.runtime.entry import Entry

log = logging.getLogger(__name__)


class Gateway(Entry):
    """Routes requests to data workers and their events back to the sinks."""

    def __init__(self, channel: Channel, data_workers: Iterable[str],
                 workers: Iterable[str]):
        """`data_workers`: the frontends' addresses, in routing order; `workers`: the
        worker addresses whose `WorkerReady` (forwarded by the conductor) readiness waits
        for, besides every data worker's."""
        super().__init__(channel.address)
        self.channel = channel
        self.data_workers = list(data_workers)
        self.expected_workers = set(self.data_workers) | set(workers)
        self._dead: set[str] = set()
        self._live: dict[str, tuple[str, Sink]] = {}  # request id -> (data worker, sink)
        self._load: dict[str, int] = dict.fromkeys(self.data_workers, 0)

    # -- requests (called from the app's threads) -------------------------------------------
    def submit(self, body: Mapping[str, Any], sink: Sink, request_id: str, *,
               kind: str = "generate", blobs: Sequence[bytes] = ()) -> str:
        """Hand `body` (of `kind`, with its media `blobs`) to a data worker; `sink` gets its
        events from the gateway's thread. Only a reused request id raises here
        (`RequestError`): a data worker reports bad input as the request's first event."""
        data = msgspec.json.encode(body)
        with self._lock:
            alive = [a for a in self.data_workers if a not in self._dead]
            if not alive:
                raise RequestError("no data worker is running", code=503)
            target = min(alive, key=lambda a: (self._load[a], self.data_workers.index(a)))
            self._claim(request_id)
            self._live[request_id] = (target, sink)
            self._load[target] += 1
        self.channel.send(target, msg.ClientRequest(request_id, data, kind, list(blobs)))
        return request_id

    def cancel(self, request_id: str, reason: str = "abort") -> None:
        """Ask the request's data worker to end it (its sink then gets the final event)."""
        with self._lock:
            entry = self._live.get(request_id)
        if entry is not None:
            self.channel.send(entry[0], msg.ClientCancel(request_id, reason))

    # -- failures (called by the launcher's monitor) ----------------------------------------
    def data_worker_died(self, address: str, message: str) -> None:
        """A data worker is gone: route nothing more to it, have the conductor end what it
        owned, and fail those requests with 503."""
        with self._lock:
            self._dead.add(address)
            owned = [rid for rid, (owner, _) in self._live.items() if owner == address]
        for rid in owned:
            self.channel.send("conductor", msg.CancelRequest(rid, "error"))
            self._finish(rid, events.Error(message, 503, "service_unavailable"))

    def fail_all(self, message: str, code: int = 503) -> None:
        """End every live request with an error (the conductor is gone)."""
        with self._lock:
            rids = list(self._live)
        for rid in rids:
            self._finish(rid, events.Error(message, code, "service_unavailable"))

    # -- messages -------------------------------------------------------------------------
    def handle(self, m: msg.Message) -> None:
        if isinstance(m, msg.ClientEvent):
            event = events.decode(m.event)
            if isinstance(event, events.Finished | events.Error):
                self._finish(m.request_id, event)
                return
            with self._lock:
                entry = self._live.get(m.request_id)
            if entry is not None:
                entry[1](event)
        else:
            self._on_report(m)

    def _finish(self, rid: str, event: events.Event) -> None:
        with self._lock:
            entry = self._live.pop(rid, None)
            if entry is not None:
                self._load[entry[0]] -= 1
        if entry is not None:
            entry[1](event)


__all__ = ["Gateway"]
