"""A deployment's child process: the conductor, one worker rank or one data worker.

`python -m mstar.serving.proc '<ProcessSpec as JSON>'` builds the model from the registry,
connects its ZMQ channel (and, for a worker or a data worker, its tensor transport) and
runs the component's loop on the main thread until a Shutdown message or SIGTERM. A data
worker is a `Frontend` (the model's `process_prompt` and `postprocess`) fed by the API
server's gateway. The launcher sets the child to die with its parent, so no process
outlives the server.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from mstar.runtime.wiring import Wiring
    from mstar.weights.peer import WeightService

log = logging.getLogger("mstar.serving")


class ProcessSpec(msgspec.Struct):
    """Everything a child needs, as plain data (no pickle)."""

    role: str  # "conductor" | "worker" | "data_worker"
    deployment_id: str
    socket_prefix: str
    protocol: str
    model: str
    config: dict
    preset: str | None = None
    load: dict = {}
    rank: int = -1  # a worker's rank, a data worker's index
    host: str = "127.0.0.1"
    tcp_device: str | None = None
    #: the RDMA transport's Mooncake port (it listens on it or the next one); 0: any
    mooncake_port: int = 0
    log_level: str = "INFO"
    cpu_threads: int = 1
    tp_port: int = 0  # rendezvous port of the first tensor-parallel group, 0: none
    tp_host: str = "127.0.0.1"  # where the tensor-parallel groups meet (node 0's address)
    #: address -> `tcp://host:port` of every component (multi-node); empty: IPC sockets
    endpoints: dict[str, str] = {}
    enable_nvtx: bool = False
    media_limits: dict = {}  # a data worker's `MediaLimits` fields (decoding chat media)
    #: the API server's gateway: readiness, worker stats and client events go there
    gateway_address: str = "api"


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (no orphans after a crash)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def make_transport(protocol: str, address: str, *, deployment_id: str, host: str,
                   device: str | None, mooncake_port: int = 0):
    from mstar.plugins import transport_registry
    from mstar.plugins.registry import import_string

    cls = import_string(transport_registry().get(protocol).transport_class)
    options = {"mooncake_port": mooncake_port} if protocol == "RDMA" else {}
    return cls(address, deployment_id=deployment_id, host=host, device=device, **options)


def peer_weights(spec: ProcessSpec, transport) -> WeightService | None:
    """A worker's service of its weights to peers, on its node's address, over its own
    transport (`mstar.weights.peer`); None (logged) when it cannot start: the rank serves
    requests all the same."""
    import sqlite3

    import zmq

    from mstar.weights.peer import PeerRegistry, WeightService, registry_dir

    where = registry_dir(spec.load.get("cache_dir"))
    try:
        return WeightService(transport, protocol=spec.protocol,
                             deployment_id=spec.deployment_id, host=spec.host,
                             registry=PeerRegistry(where))
    except (OSError, sqlite3.Error, zmq.ZMQError) as exc:
        log.warning("worker:%d does not offer its weights to peers (registry %s): %s",
                    spec.rank, where, exc)
        return None


def wiring(spec: ProcessSpec) -> Wiring:
    """The deployment's wiring as `spec` describes it (the same one `mstar.load` makes)."""
    from mstar.config import DeploymentConfig
    from mstar.plugins import model_registry
    from mstar.runtime.builder import LoadOptions, make_model
    from mstar.runtime.wiring import Wiring

    config = DeploymentConfig.model_validate(spec.config)
    options = LoadOptions(**spec.load)
    model_spec = model_registry().get(spec.model)
    model = make_model(model_spec, config.model_kwargs, preset=spec.preset, options=options)
    return Wiring(model, config, options, enable_nvtx=spec.enable_nvtx,
                  status_address=spec.gateway_address,
                  request_schema_path=model_spec.request_schema)


def run(spec: ProcessSpec) -> None:
    import torch

    from mstar.communication import messages as msg
    from mstar.communication.zmq_channel import ZmqChannel
    from mstar.media import MediaLimits

    roles = wiring(spec)
    weights = None
    if spec.role == "conductor":
        channel = ZmqChannel("conductor", prefix=spec.socket_prefix, endpoints=spec.endpoints)
        component = roles.conductor(channel)
    else:
        torch.set_num_threads(spec.cpu_threads)
        address = f"frontend:{spec.rank}" if spec.role == "data_worker" else f"worker:{spec.rank}"
        channel = ZmqChannel(address, prefix=spec.socket_prefix, endpoints=spec.endpoints)
        transport = make_transport(spec.protocol, address, deployment_id=spec.deployment_id,
                                   host=spec.host, device=spec.tcp_device,
                                   mooncake_port=spec.mooncake_port)
        if spec.role == "data_worker":
            component = roles.frontend(channel, transport,
                                       media_limits=MediaLimits(**spec.media_limits))
            channel.send(spec.gateway_address, msg.WorkerReady(address, []))
        else:
            weights = peer_weights(spec, transport) if roles.options.weights_from_peers \
                else None
            component = roles.worker(spec.rank, channel, transport, tp_port=spec.tp_port,
                                     tp_host=spec.tp_host, weights=weights)
    signal.signal(signal.SIGTERM, lambda *_: component.stop_soon())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    try:
        component.run()
    finally:
        if weights is not None:
            weights.close()
        channel.close()
        close = getattr(component, "transport", None)
        if close is not None and hasattr(close, "close"):
            close.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = msgspec.json.decode(argv[0], type=ProcessSpec)
    die_with_parent()
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s {spec.role}{'' if spec.rank < 0 else spec.rank} "
                               f"[%(process)d] %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
