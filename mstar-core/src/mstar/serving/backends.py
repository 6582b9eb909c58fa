"""The HTTP app's `Backend` over each way of running a deployment.

A deployment has an *entry*, where requests go in and the workers' reports arrive: the
in-process `Frontend` of a `LocalDeployment` (`LocalBackend`: tests, notebooks), or the
`Gateway` of a process-based one (`GatewayBackend`: `mstar serve`, whose requests go
through the gateway to the data workers, so `submit` never runs model code in the HTTP
process; liveness comes from the launcher, which watches the child processes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from mstar.api_server.backend import ModelInfo, Stats
from mstar.events import Sink
from mstar.runtime.entry import Entry

if TYPE_CHECKING:
    from mstar.communication.component import Component
    from mstar.media import MediaLimits
    from mstar.runtime.local import LocalDeployment
    from mstar.serving.launcher import ProcessDeployment


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
                 reported_at={rank: r.at for rank, r in reports.items()},
                 rank_pages_in_use={rank: r.pages_in_use for rank, r in reports.items()},
                 node_pages_in_use={(rank, node): pages for rank, r in reports.items()
                                    for node, pages in r.node_pages.items()})


class EntryBackend:
    """A `Backend` over a deployment's entry; subclasses say whether its parts are alive."""

    def __init__(self, deployment: Any, entry: Entry):
        self.deployment = deployment
        self.entry = entry

    def model_info(self) -> ModelInfo:
        spec, config = self.deployment.spec, self.deployment.config
        lacking = self.deployment.model.unavailable_capabilities()
        return ModelInfo(name=spec.name,
                         capabilities=[c for c in spec.capabilities if c not in lacking],
                         max_model_len=config.max_seq_len,
                         max_concurrent_requests=config.max_concurrent_requests,
                         request_schema=spec.request_schema,
                         config=msgspec.to_builtins(self.deployment.model.config, enc_hook=str))

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

    def degraded(self) -> str | None:
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


class GatewayBackend(EntryBackend):
    """A `Backend` over a process-based deployment (its gateway is the entry)."""

    def __init__(self, deployment: ProcessDeployment):
        super().__init__(deployment, deployment.gateway)

    def dead(self) -> str | None:
        return self.deployment.failure

    def degraded(self) -> str | None:
        return self.deployment.degraded()


__all__ = ["EntryBackend", "GatewayBackend", "LocalBackend", "entry_stats"]
