"""What the HTTP app needs from a deployment, and the adapter over an in-process one.

The app talks only to a `Backend`, so the same routes serve an in-process `LocalDeployment`
(tests, notebooks: `LocalBackend`) and the process-based deployment of `mstar-serve` (its
own adapter implements the same protocol). Everything but `submit` and `stats` is called on
the event loop, so those methods must be cheap and never block.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from mstar import events
from mstar.communication.messages import WorkerStats

if TYPE_CHECKING:
    from mstar.communication.component import Component
    from mstar.media import MediaLimits
    from mstar.runtime import LocalDeployment

Sink = Callable[[events.Event], None]


class ModelInfo(TypedDict):
    """What `/v1/models` shows, what admission needs, and the import string of the pydantic
    model of `/generate`'s body (`ModelSpec.request_schema`, None when undeclared)."""

    name: str
    capabilities: list[str]
    max_model_len: int
    max_concurrent_requests: int
    request_schema: str | None


class Stats(TypedDict):
    """The gauges `/metrics` reads at scrape time.

    `queue_depth`: node invocations waiting for an engine step, summed over the ranks (an
    admitted request always runs, so this is where work queues up); `running`: requests in
    flight; `step_seconds`: mean forward seconds per engine step of each (rank, node) over
    the workers' last report interval (absent while a node is idle); `counters`: the
    engines' cumulative counts by (rank, "<node>.<name>") (`LLM.prefix_cache_hit_tokens`);
    `invocations`: node invocations run, by (rank, graph node, walk); `parameter_bytes`:
    by (rank, node) held, (all its parameter bytes, those split by tensor parallelism);
    `reported_at`: by rank, the wall-clock time its latest report was read.
    """

    pages_in_use: int
    queue_depth: int
    running: int
    step_seconds: dict[tuple[int, str], float]
    counters: dict[tuple[int, str], int]
    invocations: dict[tuple[int, str, str], int]
    parameter_bytes: dict[tuple[int, str], tuple[int, int]]
    reported_at: dict[int, float]


class Backend(Protocol):
    def model_info(self) -> ModelInfo:
        """The served model (constant for the backend's life)."""

    def submit(self, body: Mapping[str, Any], sink: Sink, request_id: str, *,
               kind: str = "generate", blobs: Sequence[bytes] = ()) -> str:
        """Start a request (`kind` "generate", "completion" or "chat", whose media parts
        index `blobs`); `sink` receives its events from another thread, the last one
        `Finished` or `Error`. Bad input raises `mstar.engine.work.RequestError` (with
        `.code`, `.param`) where the model's `process_prompt` runs in this process, or
        arrives as a first `Error` event (code 400) where it runs in a data worker."""

    def cancel(self, request_id: str) -> None:
        """End a request early (its sink then gets a final event); unknown ids are ignored."""

    def ready(self) -> bool:
        """Every worker is up (weights loaded, warmed up) and none has failed."""

    def failed(self) -> str | None:
        """Why the deployment cannot serve (a worker failed to start or died), else None."""

    def live_requests(self) -> int:
        """Requests submitted and not yet finished (admission compares it to the limit)."""

    def is_live(self, request_id: str) -> bool:
        """Whether the request was submitted and has not finished yet."""

    def stats(self) -> Stats:
        """Current gauges (may block briefly: called off the event loop)."""

    def use_media_limits(self, limits: MediaLimits) -> None:
        """Where chat media are decoded, decode them within `limits` (the server's)."""


class Entry(Protocol):
    """Where requests enter a deployment and worker reports arrive: the in-process
    `Frontend`, or the `Gateway` of a served deployment."""

    ready: threading.Event
    startup_errors: dict[str, str]
    worker_stats: dict[str, WorkerStats]

    def submit(self, body: Mapping[str, Any], sink: Sink, *, request_id: str,
               kind: str = "generate", blobs: Sequence[bytes] = ()) -> str: ...

    def cancel(self, request_id: str, reason: str = "abort") -> None: ...

    def live_requests(self) -> int: ...

    def is_live(self, request_id: str) -> bool: ...


def entry_stats(entry: Entry) -> Stats:
    """Stats from the workers' latest `WorkerStats` reports to the entry."""
    reports = {int(r.address.rpartition(":")[2]): r for r in entry.worker_stats.values()}
    return Stats(pages_in_use=sum(r.pages_in_use for r in reports.values()),
                 queue_depth=sum(r.waiting for r in reports.values()),
                 running=entry.live_requests(),
                 step_seconds={(rank, node): seconds for rank, r in reports.items()
                               for node, seconds in r.step_seconds.items()},
                 counters={(rank, name): value for rank, r in reports.items()
                           for name, value in r.counters.items()},
                 invocations={(rank, node, walk): count for rank, r in reports.items()
                              for node, walks in r.invocations.items()
                              for walk, count in walks.items()},
                 parameter_bytes={(rank, node): held for rank, r in reports.items()
                                  for node, held in r.parameter_bytes.items()},
                 reported_at={rank: r.at for rank, r in reports.items()})


class EntryBackend:
    """A `Backend` over a deployment's entry; subclasses say whether its parts are alive."""

    def __init__(self, deployment: Any, entry: Entry):
        self.deployment = deployment
        self.entry = entry

    def model_info(self) -> ModelInfo:
        spec, config = self.deployment.spec, self.deployment.config
        return ModelInfo(name=spec.name, capabilities=list(spec.capabilities),
                         max_model_len=config.max_seq_len,
                         max_concurrent_requests=config.max_concurrent_requests,
                         request_schema=spec.request_schema)

    def submit(self, body: Mapping[str, Any], sink: Sink, request_id: str, *,
               kind: str = "generate", blobs: Sequence[bytes] = ()) -> str:
        return self.entry.submit(body, sink, request_id=request_id, kind=kind, blobs=blobs)

    def cancel(self, request_id: str) -> None:
        self.entry.cancel(request_id)

    def ready(self) -> bool:
        return self.entry.ready.is_set() and self.failed() is None

    def failed(self) -> str | None:
        errors = self.entry.startup_errors
        if errors:
            return "; ".join(f"{address} failed to start: {error}"
                             for address, error in sorted(errors.items()))
        return self.dead()

    def dead(self) -> str | None:
        """Which part of the deployment stopped, if one did."""
        return None

    def use_media_limits(self, limits: MediaLimits) -> None:
        """Decode chat media within the server's limits. Served, the launcher gave the data
        workers the same settings when it started them: nothing to do here."""

    def live_requests(self) -> int:
        return self.entry.live_requests()

    def is_live(self, request_id: str) -> bool:
        return self.entry.is_live(request_id)

    def stats(self) -> Stats:
        return entry_stats(self.entry)


class LocalBackend(EntryBackend):
    """A `Backend` over an in-process `LocalDeployment` (its frontend, conductor and workers
    are threads of this process)."""

    def __init__(self, deployment: LocalDeployment):
        super().__init__(deployment, deployment.frontend)

    def use_media_limits(self, limits: MediaLimits) -> None:
        self.deployment.frontend.media_limits = limits  # it decodes in this process

    def dead(self) -> str | None:
        d = self.deployment
        parts: list[tuple[str, Component]] = [("frontend", d.frontend), ("conductor", d.conductor)]
        parts += [(f"worker:{rank}", w) for rank, w in sorted(d.workers.items())]
        for name, component in parts:
            if not component.alive():
                return f"{name} is not running"
        return None


__all__ = ["Backend", "Entry", "EntryBackend", "LocalBackend", "ModelInfo", "Sink", "Stats",
           "entry_stats"]
