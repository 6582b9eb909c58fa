"""`run_server`: a deployment as processes behind the HTTP API.

This process runs the API server (uvicorn) and the gateway (`mstar.serving.gateway`);
the data workers (a frontend each: the model's `process_prompt` and `postprocess`), the
conductor and one worker per rank are child processes (`mstar.serving.proc`) that talk
over ZMQ and move tensors through the chosen transport. Start-up never hangs: children
that exit or report an error fail it within its timeout. A child that dies later fails its
requests with 503 (a worker's through the conductor, a data worker's through the gateway),
turns `/health` unhealthy and stops the server with `EXIT_CHILD_DIED`, so that a supervisor
starts it again (a dead rank cannot rejoin in place: its peers, its tensor-parallel group
and the KV pages of its requests are gone with it); until it has stopped, requests get 503
with Retry-After. With data-parallel replicas, a worker that dies
after start-up takes only its replica out of rotation (its requests fail with 503, `/health`
reports the deployment degraded) and the server stops only when no replica is left.
SIGINT/SIGTERM drain (uvicorn's graceful shutdown): requests still running
after `shutdown_grace` end with a 503 error event, then every child is stopped and sockets
and SHM segments are removed. What a killed server left is swept at the next start
(`mstar.serving.leftovers`).

With `--nnodes` N > 1 this is node 0: it first waits for the other nodes to join
(`mstar.serving.nodes`), then runs only its own ranks' workers, every component on a ZMQ
`tcp://` endpoint; a node lost counts as a dead child. Nodes 1..N-1 run
`mstar.serving.agent` instead (`run_server` picks it by `--node-rank`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import itertools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from mstar.communication import messages as msg
from mstar.communication.zmq_channel import ZmqChannel
from mstar.config import DeploymentConfig, placement, validate_for_model
from mstar.config.nodes import node_hosts, node_ranks
from mstar.config.settings import ServerSettings
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, make_model, tp_group_ranks
from mstar.serving import leftovers
from mstar.serving.cache_upkeep import start_upkeep
from mstar.serving.gateway import Gateway
from mstar.serving.nodes import NodeLinks, Welcome, control_endpoints, identity
from mstar.serving.proc import ProcessSpec

log = logging.getLogger("mstar.serving")

#: The exit status after a child process died while serving (start-up failures exit 1).
EXIT_CHILD_DIED = 3
#: Seconds uvicorn waits beyond `shutdown_grace` for the 503s of requests still running
#: to reach their clients, before it cancels what is left.
_GRACE_MARGIN_S = 5.0


def resolve_protocol(requested: str | None, *, node_count: int = 1) -> str:
    """The tensor transport: RDMA needs Mooncake; without it the default is SHM on one
    node (said in the log) and an explicit RDMA is an error."""
    has_mooncake = importlib.util.find_spec("mooncake") is not None
    if requested is None:
        if has_mooncake:
            return "RDMA"
        log.info("Mooncake is not installed: using the SHM tensor transport on this node "
                 "(install mstar-core[rdma] for RDMA, or pass --tensor-comm-protocol TCP)")
        return "SHM" if node_count == 1 else "TCP"
    if requested.upper() == "SHM" and node_count > 1:
        raise ValueError(f"--tensor-comm-protocol SHM moves tensors within one node: across "
                         f"{node_count} nodes (--nnodes) pass TCP or RDMA")
    if requested.upper() == "RDMA" and not has_mooncake:
        raise ValueError("--tensor-comm-protocol RDMA needs Mooncake: install the `rdma` "
                         "extra (pip install 'mstar-core[rdma]') or pass SHM or TCP")
    return requested.upper()


def mooncake_ports(first: int) -> Iterator[int]:
    """The Mooncake port of each child on this node with a tensor transport: `first`,
    `first + 2`, ... (each RDMA transport listens on its port or the next one); all 0 (any
    free port) when `first` is 0."""
    return itertools.count(first, 2) if first else itertools.repeat(0)


def worker_threads(cpu_threads: int | None, ranks: int, cpus: int | None = None) -> int:
    """torch threads of each rank's worker: `--cpu-threads` when given, else the machine's
    cores divided among the ranks (at least one)."""
    return cpu_threads or max(1, (cpus or os.cpu_count() or 1) // ranks)

class ProcessDeployment:
    """The data workers, the conductor and the workers as child processes; the gateway in
    this process."""

    def __init__(self, settings: ServerSettings, config: DeploymentConfig, *,
                 cancelled: Callable[[], bool] = lambda: False):
        """`cancelled`: polled while node 0 waits for the other nodes to join (a signal
        that came meanwhile ends the wait)."""
        self.settings, self.config = settings, config
        self.id = uuid.uuid4().hex[:8]
        self.protocol = resolve_protocol(settings.tensor_comm_protocol,
                                         node_count=settings.nnodes)
        self.spec = model_registry().get(config.model)
        options = LoadOptions.of(self.spec, load_format=settings.load_format,
                                 model_path=settings.model_path, cache_dir=settings.cache_dir,
                                 revisions=settings.revision or {}).at_commits()
        self.model = make_model(self.spec, config.model_kwargs, preset=settings.preset,
                                options=options)
        validate_for_model(config, self.model)
        where = placement(config, self.model)
        self.ranks = where.ranks()
        self.replica_of = {f"worker:{r}": where.replica_of(r) for r in self.ranks}
        #: replicas out of rotation (a worker of theirs died while serving) -> why
        self.dead_replicas: dict[int, str] = {}
        tp_port = 0
        if any(p.tp_size > 1 for p in where.nodes.values()):
            for rank in self.ranks:
                tp_group_ranks(where.nodes_on(rank))  # one tensor-parallel group per rank
            tp_port = free_port()
        self.failure: str | None = None
        #: called (from the monitor thread) when a child dies: the server stops
        self.on_child_death: Callable[[str], None] | None = None
        self._closing = False
        #: each node's ranks (node 0: this one); the other nodes' links (multi-node)
        self.node_ranks = node_ranks(config, self.ranks, settings.nnodes)
        self.links: NodeLinks | None = None
        data_workers = [f"frontend:{k}" for k in range(settings.data_workers)]
        host, endpoints, tp_host = "127.0.0.1", {}, "127.0.0.1"
        if settings.nnodes > 1:
            hosts = self._join_nodes(settings, config, cancelled)
            host, tp_host = hosts[0], settings.master_addr
            placed = {"api": host, "conductor": host, **dict.fromkeys(data_workers, host)}
            placed |= {f"worker:{r}": hosts[k] for k, ranks in enumerate(self.node_ranks)
                       for r in ranks}
            endpoints = control_endpoints(placed, settings.master_port + 1)
            tp_port = settings.master_port + 1 + len(endpoints)
        #: the lease on the weights served (and background eviction), until `close`
        self.upkeep = start_upkeep(settings, options, f"{config.model} at {settings.host}:"
                                                      f"{settings.port}")
        self.socket_dir = Path(settings.socket_path_prefix) / f"d{self.id}"
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        leftovers.claim(self.socket_dir)
        self.gateway = Gateway(ZmqChannel("api", prefix=str(self.socket_dir),
                                          endpoints=endpoints), data_workers,
                               [f"worker:{r}" for r in self.ranks])
        self.gateway.start()
        threads = worker_threads(settings.cpu_threads, len(self.node_ranks[0]))
        base = dict(deployment_id=self.id, socket_prefix=str(self.socket_dir),
                    protocol=self.protocol, model=config.model, config=config.model_dump(),
                    preset=settings.preset, load=dataclasses.asdict(options),
                    tcp_device=settings.tcp_transfer_device,
                    log_level=settings.log_level, gateway_address=self.gateway.channel.address,
                    enable_nvtx=settings.enable_nvtx,
                    media_limits=dataclasses.asdict(settings.media_limits()),
                    host=host, endpoints=endpoints, tp_host=tp_host)
        self.procs: dict[str, subprocess.Popen] = {
            "conductor": self._spawn(ProcessSpec(role="conductor", **base))}
        ports = mooncake_ports(settings.mooncake_port)
        for k, address in enumerate(data_workers):
            # one torch thread each: data workers scale by their number, the ranks need cores
            self.procs[address] = self._spawn(ProcessSpec(role="data_worker", rank=k,
                                                          mooncake_port=next(ports), **base))
        for rank in self.node_ranks[0]:
            self.procs[f"worker:{rank}"] = self._spawn(ProcessSpec(
                role="worker", rank=rank, cpu_threads=threads,
                tp_port=tp_port, mooncake_port=next(ports), **base))
        if self.links is not None:
            for k in range(1, settings.nnodes):
                self.links.welcome(k, Welcome(self.id, self.protocol, self.node_ranks[k],
                                              endpoints, tp_port, tp_host))
        self._monitor = threading.Thread(target=self._watch, name="monitor", daemon=True)
        self._monitor.start()

    def _spawn(self, spec: ProcessSpec) -> subprocess.Popen:
        return spawn(spec)

    def _join_nodes(self, settings: ServerSettings, config: DeploymentConfig,
                    cancelled: Callable[[], bool]) -> list[str]:
        """Listen for the other nodes and wait until all joined; each node's address."""
        ident, digest = identity(config.model_dump(mode="json"), model=config.model,
                                 preset=settings.preset, load_format=settings.load_format)
        self.links = NodeLinks(settings.master_addr, settings.master_port,
                               nnodes=settings.nnodes, identity=ident, digest=digest,
                               on_lost=self._node_lost, on_child_died=self._remote_died)
        log.info("node 0: waiting for %d more node(s) at %s:%d", settings.nnodes - 1,
                 settings.master_addr, settings.master_port)
        missing = self.links.wait_joined(settings.startup_timeout, cancelled)
        if missing:
            self.links.stop(1)
            raise NodesMissing(f"node(s) {', '.join(map(str, missing))} of {settings.nnodes} "
                               f"did not join at {settings.master_addr}:"
                               f"{settings.master_port} within {settings.startup_timeout:g} s")
        joined = self.links.hosts()
        named = node_hosts(config, settings.nnodes, settings.master_addr)
        return [named[k] or joined[k] for k in range(settings.nnodes)]

    def _node_lost(self, k: int, message: str) -> None:
        """Node k is gone with every rank on it: as if each of its workers died."""
        self._remote_died(*[f"worker:{r}" for r in self.node_ranks[k]], message=message)

    def _remote_died(self, *addresses: str, message: str) -> None:
        """Workers of another node are gone: their requests fail, the server stops."""
        if self._closing:
            return
        log.error("%s", message)
        if self.failure is None:
            self.failure = message
        gateway = getattr(self, "gateway", None)  # none yet while the nodes join
        if gateway is not None:
            for address in addresses:
                gateway.channel.send("conductor", msg.WorkerDied(address, message))
        if self.on_child_death is not None:
            self.on_child_death(message)

    def _watch(self) -> None:
        """Every child that exits while serving fails what it was running; the first one
        to go is the deployment's failure (`/health` turns unhealthy) and stops the server
        (`on_child_death`), unless it is a worker of a replica while others still serve."""
        gone: set[str] = set()
        while not self._closing:
            for name, proc in self.procs.items():
                code = proc.poll()
                if code is None or name in gone or self._closing:
                    continue
                gone.add(name)
                message = f"{name} exited with code {code}"
                log.error("%s", message)
                serving_on = name in self.replica_of and self._replica_lost(name, message)
                if self.failure is None and not serving_on:
                    self.failure = message
                if name == "conductor":
                    self.gateway.fail_all(message, 503)
                elif name in self.gateway.data_workers:
                    self.gateway.data_worker_died(name, message)
                else:
                    self.gateway.channel.send("conductor", msg.WorkerDied(name, message))
                if self.on_child_death is not None and not serving_on:
                    self.on_child_death(message)
            time.sleep(0.1)

    def _replica_lost(self, worker: str, message: str) -> bool:
        """Take `worker`'s replica out of rotation; True while another replica serves (a
        death during start-up fails the start as before)."""
        replicas = len(set(self.replica_of.values()))
        if replicas == 1 or not self.gateway.ready.is_set():
            return False
        replica = self.replica_of[worker]
        self.dead_replicas.setdefault(replica, message)
        if len(self.dead_replicas) == replicas:
            return False
        log.error("replica %d is out of rotation (%s); %d of %d replica(s) serve on",
                  replica, message, replicas - len(self.dead_replicas), replicas)
        return True

    def degraded(self) -> str | None:
        """Which replicas are down while the others serve, else None."""
        if not self.dead_replicas or self.failure is not None:
            return None
        return "; ".join(f"replica {k} is down ({why})"
                         for k, why in sorted(self.dead_replicas.items()))

    def wait_ready(self, timeout: float) -> bool:
        """True once every worker and data worker reported ready; False on a start-up
        failure or timeout (then `failure` says why)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.failure is not None:
                return False
            if self.gateway.ready.wait(timeout=0.1):
                if self.gateway.startup_errors:
                    self.failure = "; ".join(f"{a}: {e}" for a, e in
                                             sorted(self.gateway.startup_errors.items()))
                    return False
                return True
        self.failure = f"workers not ready within {timeout:.0f} s"
        return False

    def child_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def close(self, timeout: float = 10.0) -> None:
        """Stop every child (asking first; one still starting reads no message, so it
        gets SIGTERM at once), then remove sockets and SHM segments."""
        if self._closing:
            return
        self._closing = True
        if self.links is not None:  # the other nodes stop their ranks themselves
            self.links.stop(EXIT_CHILD_DIED if self.failure else 0)
        starting = self.gateway.expected_workers - self.gateway.ready_workers
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                continue
            if name in starting:
                proc.terminate()
                continue
            try:
                self.gateway.channel.send(name, msg.Shutdown())
            except Exception:  # the socket may be gone with its process
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.gateway.stop()
        self.gateway.channel.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        if self.protocol == "SHM":
            from mstar.communication.shm import cleanup_deployment

            cleanup_deployment(self.id)
        self.upkeep.stop()


class NodesMissing(RuntimeError):
    """Node 0 gave up waiting for the other nodes to join."""


def spawn(spec: ProcessSpec) -> subprocess.Popen:
    """Start one child (`mstar.serving.proc`)."""
    return subprocess.Popen([sys.executable, "-m", "mstar.serving.proc",
                             msgspec.json.encode(spec).decode()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> str | None:
    """None when `host:port` can be bound, else the reason."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return str(exc)
    return None


def draining_server(config: Any, grace: float, fail: Callable[[], None]) -> Any:
    """A uvicorn server whose graceful shutdown calls `fail` after `grace` seconds: it ends
    the requests still running with a 503 error event, so their clients get a clean answer
    and uvicorn, which waits longer, never cancels a task mid-response."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            timer = asyncio.get_running_loop().call_later(grace, fail)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)


def run_server(settings: ServerSettings, config: DeploymentConfig) -> int:
    """Serve until SIGINT/SIGTERM, or until a child dies; the exit code (0 after a clean
    shutdown, 1 when start-up failed, `EXIT_CHILD_DIED`). On a node other than node 0 this
    runs the node's agent (`mstar.serving.agent`) instead: no HTTP."""
    if settings.node_rank > 0:
        from mstar.serving.agent import run_agent

        return run_agent(settings, config)
    for port, what in ((settings.port, ""), (settings.policy_ws_port, " (--policy-ws-port)")):
        busy = None if port is None else port_is_free(settings.host, port)
        if busy is not None:
            print(f"error: cannot listen on {settings.host}:{port}{what}: {busy}",
                  file=sys.stderr)
            return 1
    leftovers.sweep(Path(settings.socket_path_prefix))
    # From here on SIGINT/SIGTERM stop the server cleanly whenever they come: one that
    # arrives before uvicorn runs is remembered (uvicorn then stops at once). uvicorn
    # re-raises the signal that stopped it once it is done, with the handlers that were
    # there before it: these, so the signal ends the drain, not the process, and the
    # children, sockets and shared memory are cleaned up below.
    stop = _StopSignal()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deployment = ProcessDeployment(settings, config, cancelled=lambda: stop.seen)
    except NodesMissing as exc:
        _restore(previous)
        if stop.seen:  # stopped while waiting: a clean stop, as during any start-up
            return 0
        print(f"error: start-up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    except BaseException:
        _restore(previous)
        raise
    try:
        return _serve(settings, config, deployment, stop)
    finally:
        deployment.close()
        _restore(previous)


class _StopSignal:
    """The SIGINT/SIGTERM handler while uvicorn does not hold the signals: a signal is
    remembered and passed on to the server once there is one."""

    def __init__(self) -> None:
        self.seen = False
        self.server: Any = None

    def __call__(self, *_: Any) -> None:
        self.seen = True
        if self.server is not None:
            self.server.should_exit = True

    def attach(self, server: Any) -> None:
        self.server = server
        if self.seen:
            server.should_exit = True


def _restore(handlers: dict[int, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _serve(settings: ServerSettings, config: DeploymentConfig, deployment: ProcessDeployment,
           stop: _StopSignal) -> int:
    """Run uvicorn over `deployment` until it stops; the exit code."""
    import uvicorn

    from mstar.api_server.app import create_app
    from mstar.api_server.plugin_routes import own_ports
    from mstar.serving.backends import GatewayBackend

    exit_code = [0]

    def fail_running() -> None:
        live = deployment.gateway.live_requests()
        if live:
            log.warning("%d request(s) still running after the %g s shutdown grace: ended "
                        "with 503", live, settings.shutdown_grace)
            deployment.gateway.fail_all("the server is shutting down; retry on a new one", 503)

    app = create_app(GatewayBackend(deployment), settings)
    uv_config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        lifespan="off", access_log=False,  # the app logs one line per request, with its id
        timeout_graceful_shutdown=int(settings.shutdown_grace + _GRACE_MARGIN_S))
    sockets = _listeners(uv_config, settings, own_ports(app))
    if sockets is None:
        return 1
    server = draining_server(uv_config, settings.shutdown_grace, fail_running)
    stop.attach(server)

    def child_died(message: str) -> None:
        if exit_code[0] == 0:
            exit_code[0] = EXIT_CHILD_DIED
            log.error("stopping the server (exit status %d) so that it can be started "
                      "again: %s", EXIT_CHILD_DIED, message)
        server.should_exit = True

    deployment.on_child_death = child_died

    def announce() -> None:
        if deployment.wait_ready(settings.startup_timeout):
            print(f"mstar: serving {config.model} at http://{settings.host}:{settings.port} "
                  f"({len(deployment.ranks)} rank(s), {settings.data_workers} data worker(s), "
                  f"{deployment.protocol})", flush=True)
        else:
            print(f"error: start-up failed: {deployment.failure}", file=sys.stderr, flush=True)
            exit_code[0] = 1
            server.should_exit = True

    threading.Thread(target=announce, name="announce", daemon=True).start()
    server.run(sockets=sockets)
    return exit_code[0]


def _listeners(config: Any, settings: ServerSettings, own: list[int],
               ) -> list[socket.socket] | None:
    """The bound sockets uvicorn serves: the API's port, then each port a plugin route is
    served on too (`mstar.api_server.plugin_routes.own_ports`), all in one server so they
    start and drain together; None (said on stderr) when one cannot be bound."""
    if settings.policy_ws_port is not None and settings.policy_ws_port not in own:
        log.warning("--policy-ws-port %d: the model serves no websocket route on it",
                    settings.policy_ws_port)
    sockets = [config.bind_socket()]
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    for port in own:
        try:
            sockets.append(socket.create_server((settings.host, port), family=family))
        except OSError as exc:
            print(f"error: cannot listen on {settings.host}:{port} (a plugin's websocket "
                  f"route's own port): {exc}", file=sys.stderr)
            for sock in sockets:
                sock.close()
            return None
        log.info("a plugin's websocket route is served on %s:%d too", settings.host, port)
    return sockets
