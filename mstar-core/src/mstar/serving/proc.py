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
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import torch

    from mstar.config import DeploymentConfig, Placement
    from mstar.model.contract import Model
    from mstar.worker.builder import LoadOptions

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
    log_level: str = "INFO"
    cpu_threads: int = 1
    tp_port: int = 0  # rendezvous port of the tensor-parallel group, 0: none
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
                   device: str | None):
    from mstar.plugins import transport_registry
    from mstar.plugins.registry import import_string

    cls = import_string(transport_registry().get(protocol).transport_class)
    return cls(address, deployment_id=deployment_id, host=host, device=device)


def worker_engines(spec: ProcessSpec, model: Model, config: DeploymentConfig,
                   where: Placement, options: LoadOptions
                   ) -> tuple[torch.device, Callable[[], dict[str, Any]]]:
    """A worker rank's device (`device_plan`, as `mstar.load` places the same rank) and its
    engine builder; joins the rank's tensor-parallel group over that device's backend."""
    import torch

    from mstar.config.devices import device_plan, tp_backend
    from mstar.worker.builder import build_engines, tp_group_ranks

    devices = device_plan(config, where)
    device = torch.device(devices.device(spec.rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    nodes = where.nodes_on(spec.rank)
    group = tp_group_ranks(nodes)
    if group:
        import datetime

        import torch.distributed as dist

        dist.init_process_group(tp_backend(str(device)),
                                init_method=f"tcp://127.0.0.1:{spec.tp_port}",
                                rank=group.index(spec.rank), world_size=len(group),
                                timeout=datetime.timedelta(seconds=120))
    eos = getattr(model.tokenizer(), "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (
        (eos,) if eos is not None else ())
    return device, functools.partial(
        build_engines, model, config, nodes, spec.rank, options, device=device,
        ranks_sharing_device=devices.ranks_sharing(spec.rank), eos_token_ids=eos_ids,
        tp_group=torch.distributed.group.WORLD if group else None,
        enable_nvtx=spec.enable_nvtx)


def run(spec: ProcessSpec) -> None:
    import torch

    from mstar.api_server.frontend import Frontend
    from mstar.communication import messages as msg
    from mstar.communication.zmq_channel import ZmqChannel
    from mstar.conductor.conductor import Conductor
    from mstar.config import DeploymentConfig, placement
    from mstar.plugins import model_registry
    from mstar.worker.builder import LoadOptions, make_model
    from mstar.worker.worker import Worker

    config = DeploymentConfig.model_validate(spec.config)
    model_spec = model_registry().get(spec.model)
    options = LoadOptions(**spec.load)
    model = make_model(model_spec, config.model_kwargs, preset=spec.preset, options=options)
    where = placement(config, model)
    if spec.role == "conductor":
        channel = ZmqChannel("conductor", prefix=spec.socket_prefix)
        component = Conductor(model, where, channel,
                              max_concurrent_requests=config.max_concurrent_requests,
                              status_address=spec.gateway_address)
    elif spec.role == "data_worker":
        torch.set_num_threads(spec.cpu_threads)
        address = f"frontend:{spec.rank}"
        channel = ZmqChannel(address, prefix=spec.socket_prefix)
        transport = make_transport(spec.protocol, address, deployment_id=spec.deployment_id,
                                   host=spec.host, device=spec.tcp_device)
        from mstar.media import MediaLimits

        component = Frontend(model, config, channel, transport, client=spec.gateway_address,
                             media_limits=MediaLimits(**spec.media_limits))
        channel.send(spec.gateway_address, msg.WorkerReady(address, []))
    else:
        torch.set_num_threads(spec.cpu_threads)
        address = f"worker:{spec.rank}"
        channel = ZmqChannel(address, prefix=spec.socket_prefix)
        transport = make_transport(spec.protocol, address, deployment_id=spec.deployment_id,
                                   host=spec.host, device=spec.tcp_device)
        device, build = worker_engines(spec, model, config, where, options)
        component = Worker(spec.rank, model, channel, transport, build_engines=build,
                           status_address=spec.gateway_address, device=device)
    signal.signal(signal.SIGTERM, lambda *_: component.stop_soon())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when we stop
    try:
        component.run()
    finally:
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
