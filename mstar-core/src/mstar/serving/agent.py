"""A node other than node 0: `mstar-serve --node-rank K` (K > 0) runs this agent, not the
API server.

It joins node 0 over the node link (`mstar.serving.nodes`; refused, it says why and exits
1), starts a worker process for each of its ranks with the control endpoints and
tensor-parallel rendezvous node 0 sent, and watches them: a worker that exits is reported
to node 0 (whose conductor fails its requests, as for a local worker). It stops its
workers when node 0 says `Stop` (exiting with the status node 0 gives: `EXIT_CHILD_DIED`
after a failure, so a supervisor restarts the node too), when node 0's link ends (node 0
is gone: `EXIT_CHILD_DIED`), or on SIGTERM/SIGINT (node 0 then counts the node as lost).
"""

from __future__ import annotations

import dataclasses
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from mstar.config import DeploymentConfig
from mstar.config.nodes import node_hosts
from mstar.config.settings import ServerSettings
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions
from mstar.serving.cache_upkeep import start_upkeep
from mstar.serving.launcher import EXIT_CHILD_DIED, mooncake_ports, spawn, worker_threads
from mstar.serving.nodes import (
    HEARTBEAT_S,
    ChildDied,
    Heartbeat,
    Hello,
    Refused,
    Stop,
    Welcome,
    identity,
    receive,
    send,
)
from mstar.serving.proc import ProcessSpec


def _error(text: str) -> int:
    print(f"error: {text}", file=sys.stderr, flush=True)
    return 1


def node_address(settings: ServerSettings, config: DeploymentConfig) -> str | None:
    """This node's address: the config's (`nodes`), else `--host` when it names one (a
    node other than node 0 serves no HTTP, so its bind address is the node's), else None:
    the address this node reaches node 0 from."""
    named = node_hosts(config, settings.nnodes, settings.master_addr)[settings.node_rank]
    wildcard = settings.host in ("", "0.0.0.0", "::")
    return named or (None if wildcard else settings.host)


def _connect(settings: ServerSettings, host: str | None,
             stopping: threading.Event) -> socket.socket | None:
    """The link to node 0 (from `host` when given), which may start after this node:
    retried until `startup_timeout`."""
    deadline = time.monotonic() + settings.startup_timeout
    while not stopping.is_set() and time.monotonic() < deadline:
        try:
            return socket.create_connection((settings.master_addr, settings.master_port),
                                            timeout=5,
                                            source_address=(host, 0) if host else None)
        except OSError:
            stopping.wait(0.5)
    return None


def run_agent(settings: ServerSettings, config: DeploymentConfig) -> int:
    """Run node `settings.node_rank`'s ranks until node 0 stops them; the exit status."""
    k = settings.node_rank
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        host = node_address(settings, config)
        link = _connect(settings, host, stopping)
        if link is None:
            return _error(f"node {k}: node 0 did not answer at {settings.master_addr}:"
                          f"{settings.master_port} within {settings.startup_timeout:g} s")
        with link:
            return _join_and_run(settings, config, link, host or link.getsockname()[0],
                                 stopping)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _join_and_run(settings: ServerSettings, config: DeploymentConfig, link: socket.socket,
                  host: str, stopping: threading.Event) -> int:
    k = settings.node_rank
    ident, digest = identity(config.model_dump(mode="json"), model=config.model,
                             preset=settings.preset, load_format=settings.load_format)
    send(link, Hello(k, settings.nnodes, host, ident, digest))
    link.settimeout(None)
    reader = link.makefile("rb")
    reply = _wait_reply(link, reader, settings.startup_timeout, stopping)
    if isinstance(reply, Refused):
        return _error(f"node 0 refused node {k}: {reply.reason}")
    if not isinstance(reply, Welcome):
        return _error(f"node {k}: node 0 sent no welcome (its link ended)")
    spec = model_registry().get(config.model)
    options = LoadOptions.of(spec, load_format=settings.load_format,
                             model_path=settings.model_path, cache_dir=settings.cache_dir,
                             revisions=settings.revision or {}).at_commits()
    upkeep = start_upkeep(settings, options, f"{config.model} node {k} ({host})")
    threads = worker_threads(settings.cpu_threads, len(reply.ranks))
    ports = mooncake_ports(settings.mooncake_port)  # this node's
    procs = {f"worker:{rank}": spawn(ProcessSpec(
        role="worker", rank=rank, deployment_id=reply.deployment_id,
        socket_prefix=settings.socket_path_prefix, protocol=reply.protocol, model=config.model,
        config=config.model_dump(), preset=settings.preset, load=dataclasses.asdict(options),
        host=host, tcp_device=settings.tcp_transfer_device, log_level=settings.log_level,
        cpu_threads=threads, tp_port=reply.tp_port, tp_host=reply.tp_host,
        enable_nvtx=settings.enable_nvtx, endpoints=reply.endpoints,
        mooncake_port=next(ports))) for rank in reply.ranks}
    print(f"mstar: node {k} ({host}) runs rank(s) {', '.join(map(str, reply.ranks))} of "
          f"{config.model}, joined node 0 at {settings.master_addr}:{settings.master_port}",
          flush=True)
    try:
        return _watch(link, reader, procs, f"node {k} ({host})", stopping)
    finally:
        _stop(procs)
        upkeep.stop()


def _wait_reply(link: socket.socket, reader, timeout: float,
                stopping: threading.Event) -> object:
    """Node 0's answer (it welcomes once every node joined), with heartbeats meanwhile."""
    deadline = time.monotonic() + timeout
    while not stopping.is_set() and time.monotonic() < deadline:
        if select.select([link], [], [], HEARTBEAT_S)[0]:
            return receive(reader)
        send(link, Heartbeat())
    return None


def _watch(link: socket.socket, reader, procs: dict[str, subprocess.Popen], node: str,
           stopping: threading.Event) -> int:
    """Heartbeats to node 0 and its children's deaths, until it stops (its `Stop` code),
    its link ends (`EXIT_CHILD_DIED`) or a signal came (0)."""
    gone: set[str] = set()
    try:
        while not stopping.is_set():
            if select.select([link], [], [], HEARTBEAT_S)[0]:
                m = receive(reader)
                if m is None:
                    print(f"error: {node}: node 0 is gone; stopping this node's workers",
                          file=sys.stderr, flush=True)
                    return EXIT_CHILD_DIED
                if isinstance(m, Stop):
                    return m.code
            send(link, Heartbeat())
            for name, proc in procs.items():
                code = proc.poll()
                if code is not None and name not in gone:
                    gone.add(name)
                    send(link, ChildDied(name, f"{name} on {node} exited with code {code}"))
    except OSError as exc:
        print(f"error: {node}: the link to node 0 failed ({exc})", file=sys.stderr,
              flush=True)
        return EXIT_CHILD_DIED
    return 0


def _stop(procs: dict[str, subprocess.Popen], timeout: float = 10.0) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
