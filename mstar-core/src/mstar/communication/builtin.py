"""Core's built-in plugin: the tensor transports mstar ships, registered through the same
hook as any plugin's (the plugin manager loads this module by name). Import strings only:
listing transports imports no torch."""

from __future__ import annotations

from mstar.plugins.hookspecs import hookimpl
from mstar.plugins.registry import TransportRegistry, TransportSpec


@hookimpl
def mstar_register_transports(registry: TransportRegistry) -> None:
    registry.add(TransportSpec(
        "LOCAL", "mstar.communication.transport:LocalTransport",
        "in-process only: components of one process share a store, no copy"))
    registry.add(TransportSpec(
        "SHM", "mstar.communication.shm:ShmTransport",
        "POSIX shared memory (/dev/shm) between processes of one node; GPU tensors via host"))
    registry.add(TransportSpec(
        "TCP", "mstar.communication.tcp:TcpTransport",
        "receivers pull from the sender's memory over TCP; any nodes"))
    registry.add(TransportSpec(
        "RDMA", "mstar.communication.mooncake:MooncakeTransport",
        "receivers read the sender's registered memory through Mooncake's transfer engine "
        "(RDMA, or Mooncake's TCP without RDMA devices); any nodes; needs mstar-core[rdma]"))
