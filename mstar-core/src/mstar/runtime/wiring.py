"""One wiring of a deployment's roles, used by `mstar.load` and by `mstar serve`.

A deployment runs a conductor, data workers (`Frontend`) and one worker per rank, either
as threads of one process (`mstar.runtime.local.LocalDeployment`) or as one process each
(`mstar.serving.proc`). Both callers make a `Wiring` from the same inputs and ask it for
each role, handing in only what differs between them: the channel and transport (in-process
hub or ZMQ/SHM/TCP), where status goes, and the tensor-parallel rendezvous. Every other
option (device, dtype, TP group and backend, NVTX, eos ids, KV sizing, encoder cache,
prefix caching) is decided here once, so it cannot reach one path and miss the other.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mstar.communication.channel import Channel
from mstar.communication.transport import Transport
from mstar.config import DeploymentConfig, Placement, placement, validate_for_model
from mstar.config.devices import DevicePlan, device_plan, tp_backend
from mstar.media import MediaLimits
from mstar.model.contract import Model
from mstar.plugins.registry import import_string
from mstar.runtime.builder import LoadOptions, build_engines, tp_group_ranks, weight_key
from mstar.runtime.conductor import Conductor
from mstar.runtime.frontend import Frontend
from mstar.runtime.worker import Worker
from mstar.weights.peer import WeightService


def eos_token_ids(model: Model) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence ids (one id or a list of them), as a tuple."""
    eos = getattr(model.tokenizer(), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (eos,)


@dataclass
class Wiring:
    """The roles of one deployment of `model` under `config`. `status_address`: where
    readiness and worker stats go (the frontend in one process, the API server's gateway
    when served); `request_schema`: the import string of the model's `/generate` request
    model (`ModelSpec.request_schema`), whose media and tensor fields the frontend decodes."""

    model: Model
    config: DeploymentConfig
    options: LoadOptions
    enable_nvtx: bool = False
    status_address: str = "frontend"
    request_schema_path: str | None = None
    placement: Placement = field(init=False)

    def __post_init__(self) -> None:
        validate_for_model(self.config, self.model)
        self.placement = placement(self.config, self.model)

    @functools.cached_property
    def devices(self) -> DevicePlan:
        """Each rank's device (made when a worker is wired: only workers need it)."""
        return device_plan(self.config, self.placement)

    @functools.cached_property
    def eos_token_ids(self) -> tuple[int, ...]:
        return eos_token_ids(self.model)

    def on_device(self, device: str) -> Wiring:
        """The same deployment with every rank on `device` (a `devices` mapping, checked
        as one)."""
        config = self.config.model_copy(
            update={"devices": dict.fromkeys(self.placement.ranks(), device)})
        return dataclasses.replace(self, config=config)

    def conductor(self, channel: Channel) -> Conductor:
        return Conductor(self.model, self.placement, channel,
                         max_concurrent_requests=self.config.max_concurrent_requests,
                         status_address=self.status_address,
                         max_children=self.config.max_children)

    def frontend(self, channel: Channel, transport: Transport, *,
                 media_limits: MediaLimits | None = None) -> Frontend:
        """A data worker; served, its client is the gateway (`status_address`)."""
        extra = {} if self.status_address == "frontend" else {"client": self.status_address}
        return Frontend(self.model, self.config, channel, transport,
                        media_limits=media_limits, request_schema=self.request_schema, **extra)

    @functools.cached_property
    def request_schema(self) -> Any:
        """The model's `/generate` request model, or None when it declares none."""
        return import_string(self.request_schema_path) if self.request_schema_path else None

    def worker_engines(self, rank: int, *, tp_group: Any = None
                       ) -> tuple[torch.device, Callable[[], dict[str, Any]]]:
        """`rank`'s device and the builder of its engines (run on the worker's thread)."""
        device = torch.device(self.devices.device(rank))
        return device, functools.partial(
            build_engines, self.model, self.config, self.placement.nodes_on(rank), rank,
            self.options, device=device, ranks_sharing_device=self.devices.ranks_sharing(rank),
            eos_token_ids=self.eos_token_ids, tp_group=tp_group, enable_nvtx=self.enable_nvtx)

    def worker(self, rank: int, channel: Channel, transport: Transport, *,
               tp_port: int = 0, tp_host: str = "127.0.0.1",
               weights: WeightService | None = None) -> Worker:
        """Worker `rank`; a rank in a tensor-parallel group joins it first (over the
        backend of its device, rendezvous at `tp_host`), which needs a process per rank.
        `weights`: the service that hands the rank's weights to peers once loaded."""
        group = self.join_tp_group(rank, tp_port, tp_host)
        device, build = self.worker_engines(rank, tp_group=group)
        if weights is not None:
            build = functools.partial(self._publishing, build, rank, device, weights)
        return Worker(rank, self.model, channel, transport, build_engines=build,
                      status_address=self.status_address, device=device)

    def _publishing(self, build: Callable[[], dict[str, Any]], rank: int,
                    device: torch.device, weights: WeightService) -> dict[str, Any]:
        """`build()`, then every node's weights published under its key."""
        engines = build()
        for node, where in self.placement.nodes_on(rank).items():
            key = weight_key(self.model, node, where, rank, self.options, device)
            if key is not None:
                weights.publish(key, engines[node].module)
        return engines

    def tp_groups(self) -> list[tuple[int, ...]]:
        """The deployment's tensor-parallel groups, ordered by their leader (first) rank."""
        groups = {tp_group_ranks(self.placement.nodes_on(r)) for r in self.placement.ranks()}
        return sorted((g for g in groups if g), key=lambda g: g[0])

    def join_tp_group(self, rank: int, tp_port: int, host: str = "127.0.0.1") -> Any:
        """Join `rank`'s group: group g (`tp_groups` order) meets at `host:(tp_port + g)`,
        so disjoint groups never share a rendezvous, on one node or several."""
        group = tp_group_ranks(self.placement.nodes_on(rank))
        device = torch.device(self.devices.device(rank))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not group:
            return None
        if not tp_port:
            raise ValueError("tp_size > 1 needs one process per rank: serve it with "
                             "`mstar-serve` (the in-process API runs tp_size 1 only)")
        import torch.distributed as dist

        port = tp_port + self.tp_groups().index(group)
        dist.init_process_group(tp_backend(str(device)),
                                init_method=f"tcp://{host}:{port}",
                                rank=group.index(rank), world_size=len(group),
                                timeout=datetime.timedelta(seconds=120))
        return dist.group.WORLD
