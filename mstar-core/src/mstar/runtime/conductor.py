"""The conductor: request lifecycle and walk boundaries.

It admits a request (bounded by `max_concurrent_requests`), starts the first walk of each
partition the request uses on a worker chosen by `select_worker`, and at every walk end asks
the model's `next_walk` (host values only: control outputs and result handles) what comes
next. When every lane of every partition has finished, it tells the request's frontend
(`RequestInfo.frontend`) how many outputs to expect from each worker and has the workers
release the request. It never touches a tensor.

Stalls are events, not timers: a live request is stalled when every worker that was sent
any of its work has reported it `Blocked` and none of its messages is on its way (each
worker has handled exactly as many as the conductor and the other workers' reports say
were sent to it, and the conductor has every `WalkDone` the reports count). Reports are
made only while a worker has nothing of the request to run, and only a message can change
that, so the counts cannot balance while anything could still move. Such a request fails
at once with a 500 that names what it waits on, instead of waiting for its timeout; a
request that waits on client input (none does yet) is never stalled.

With data-parallel replicas each request runs on one replica, picked at `Submit` by the
`ReplicaRouter` (least loaded; prefix affinity), and every walk of it stays there
(`owner_of(walk, replica)`). A worker's death takes its replica out of rotation and fails
that replica's requests with a 503 naming the worker; the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mstar.communication import messages as msg
from mstar.communication.channel import Channel
from mstar.communication.component import Component
from mstar.config.validate import Placement
from mstar.graph.primitives import walk_nodes
from mstar.model.contract import Done, Model, RequestState, WalkStep
from mstar.runtime.routing import ReplicaRouter

log = logging.getLogger(__name__)


def select_worker(candidates: Sequence[str], load: dict[str, int]) -> str:
    """The one policy for choosing among workers that hold what a walk needs: the least
    loaded, ties to the lowest rank."""
    return min(candidates, key=lambda a: (load.get(a, 0), a))


@dataclass
class ConductorRequest:
    info: msg.RequestInfo
    prompt_tokens: int
    deadline: float | None
    replica: int = 0  # the data-parallel replica every walk of it runs on
    lanes: set[tuple[str, int]] = field(default_factory=set)
    workers: set[str] = field(default_factory=set)
    outputs_sent: dict[str, int] = field(default_factory=dict)
    stream_units: dict[int, dict[str, int]] = field(default_factory=dict)
    walks_done: dict[tuple[str, int], list[str]] = field(default_factory=dict)
    store: dict[str, Any] = field(default_factory=dict)
    consumers: dict[int, str] = field(default_factory=dict)
    kv_home: dict[str, str] = field(default_factory=dict)  # KV node -> worker holding it
    producers: dict[int, str] = field(default_factory=dict)
    reason: str = "stop"
    child_reasons: dict[int, str] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)  # its work sent to each worker
    received: int = 0  # its WalkDones
    blocked: dict[str, msg.Blocked] = field(default_factory=dict)  # latest, by worker
    awaiting_input: bool = False  # the client may still send input: never a stall


class Conductor(Component):
    def __init__(self, model: Model, placement: Placement, channel: Channel, *,
                 max_concurrent_requests: int, rank_addresses: Callable[[int], str]
                 = lambda r: f"worker:{r}", status_address: str = "frontend",
                 max_children: int = 1024):
        """`status_address`: where the workers' readiness is forwarded (the frontend in one
        process, the API server's gateway when served). `max_children`: the most children
        one walk step may run (`DeploymentConfig.max_children`; more fails with a 400)."""
        super().__init__("conductor")
        self.status_address = status_address
        self.model = model
        self.placement = placement
        self.channel = channel
        self.max_concurrent = max_concurrent_requests
        self.max_children = max_children
        self.address_of = rank_addresses
        self.walks = model.graph_walks()
        self.edges = list(model.streaming_edges())
        self.partition_of = {n: p.name for p in model.partitions() for n in p.nodes}
        self.requests: dict[str, ConductorRequest] = {}
        self.ready_workers: set[str] = set()
        self.dead_workers: dict[str, str] = {}
        self.load: dict[str, int] = {}
        self.router = ReplicaRouter(placement.replicas)
        self.replica_of_worker = {rank_addresses(r): placement.replica_of(r)
                                  for r in placement.ranks()}

    # -- lifecycle --------------------------------------------------------------------------
    def tick(self) -> None:
        """Requests past their deadline end with `timeout`."""
        now = time.monotonic()
        for rid, req in list(self.requests.items()):
            if req.deadline is not None and now > req.deadline:
                self._end(rid, "timeout", error=f"request {rid} timed out", code=504)

    # -- placement --------------------------------------------------------------------------
    def kv_nodes_of(self, walk: str) -> list[str]:
        types = self.model.node_engine_types()
        return sorted({n.module for n in walk_nodes(self.walks[walk])
                       if types.get(n.module) == "kv_cache"})

    def owner_of(self, walk: str, replica: int = 0) -> str:
        """The worker that runs `walk` in `replica`: one holding its KV node (else its first
        node). A branch (`alias_of`, its own KV label) is no anchor even when it comes first
        (an image-free guidance context prefilled at the start of the walk): the request's
        main sequence lives with the node itself."""
        nodes = walk_nodes(self.walks[walk])
        types = self.model.node_engine_types()
        kv = [n for n in nodes if types.get(n.module) == "kv_cache"]
        anchor = next((n for n in kv if n.alias_of is None), kv[0] if kv else nodes[0])
        ranks = self.placement.get(walk, anchor.name, replica).ranks
        return select_worker([self.address_of(ranks[0])], self.load)

    # -- messages ---------------------------------------------------------------------------
    def handle(self, m: msg.Message) -> None:
        if isinstance(m, msg.Submit):
            self._submit(m)
        elif isinstance(m, msg.WalkDone):
            self._walk_done(m)
        elif isinstance(m, msg.WalkFailed):
            req = self.requests.get(m.request_id)
            if req is not None:
                req.outputs_sent[m.worker] = max(req.outputs_sent.get(m.worker, 0),
                                                 m.outputs_sent)
                self._end(m.request_id, "error", error=m.message, code=m.code)
        elif isinstance(m, msg.CancelRequest):
            if m.request_id in self.requests:
                self._end(m.request_id, m.reason)
        elif isinstance(m, msg.Blocked):
            req = self.requests.get(m.request_id)
            last = req.blocked.get(m.worker) if req is not None else None
            if req is not None and (last is None or m.seq > last.seq):
                req.blocked[m.worker] = m
                self._fail_if_stalled(req)
        elif isinstance(m, msg.WorkerReady):
            self.ready_workers.add(m.address)
            self.channel.send(self.status_address, m)
        elif isinstance(m, msg.WorkerDied):
            self.dead_workers[m.address] = m.message
            error = f"{m.address} died: {m.message}"
            replica = self.replica_of_worker.get(m.address)
            if replica is not None:
                self.router.kill(replica, error)
            for rid, req in list(self.requests.items()):
                if m.address in req.workers or req.replica == replica:
                    self._end(rid, "error", error=error, code=503)
        elif isinstance(m, msg.Shutdown):
            self.stop_soon()

    def _submit(self, m: msg.Submit) -> None:
        rid = m.info.request_id
        if len(self.requests) >= self.max_concurrent:
            self.channel.send(m.info.frontend, msg.Rejected(
                rid, f"server busy: {self.max_concurrent} requests already running", 429))
            return
        unknown = sorted({step.walk for step in m.first_walks.values()} - set(self.walks))
        if unknown:  # a model bug: fail the request, never the conductor
            self.channel.send(m.info.frontend, msg.Rejected(
                rid, f"the model's plan starts walk(s) {', '.join(map(repr, unknown))}, "
                     f"which it does not declare (its walks: {', '.join(sorted(self.walks))})",
                500))
            return
        too_many = next(filter(None, map(self._too_many_children, m.first_walks.values())),
                        None)
        if too_many:
            self.channel.send(m.info.frontend, msg.Rejected(rid, too_many, 400))
            return
        replica = self.router.pick(m.prefix)
        if replica is None:
            self.channel.send(m.info.frontend, msg.Rejected(
                rid, "; ".join(self.router.dead.values()), 503))
            return
        owners = {p: self.owner_of(step.walk, replica) for p, step in m.first_walks.items()}
        deadline = time.monotonic() + m.timeout if m.timeout else None
        req = self.requests[rid] = ConductorRequest(m.info, m.prompt_tokens, deadline,
                                                    replica)
        for idx, edge in enumerate(self.edges):
            src, dst = self.partition_of.get(edge.src), self.partition_of.get(edge.dst)
            if src in owners and dst in owners:
                req.consumers[idx], req.producers[idx] = owners[dst], owners[src]
        for partition, step in m.first_walks.items():
            self._dispatch(req, partition, 0, step, owners[partition])

    def _dispatch(self, req: ConductorRequest, partition: str, child: int,
                  step: msg.WalkStepMsg, owner: str) -> None:
        peers = {}
        for idx in req.consumers:
            if self.partition_of.get(self.edges[idx].src) == partition:
                peers[idx] = req.consumers[idx]
            if self.partition_of.get(self.edges[idx].dst) == partition:
                peers[idx] = req.producers[idx]
        imports = []
        for node in self.kv_nodes_of(step.walk):
            home = req.kv_home.get(node)
            if home is not None and home != owner:  # per-walk placement: the KV moves
                self._send(req, home, msg.Migrate(req.info.request_id, node, owner))
                imports.append(node)
            req.kv_home[node] = owner
        nodes = walk_nodes(self.walks[step.walk])
        remote = {}
        for n in nodes:  # nodes of this walk placed elsewhere run by NodeCall
            where = self.address_of(self.placement.get(step.walk, n.name,
                                                       req.replica).ranks[0])
            if where != owner:
                remote[n.name] = where
                req.workers.add(where)
        fork_dests = {}
        for i, f in enumerate(step.forks):  # a branch elsewhere gets its context there
            target = next((n for n in nodes if n.module == f.node and n.label == f.label
                           and n.name in remote), None)
            if target is not None:
                fork_dests[i] = remote[target.name]
        joined = self.walks[step.walk].join is not None  # its worker reports it once
        children = range(step.children) if step.children > 1 and not joined else [child]
        req.lanes.update((partition, c) for c in children)
        req.workers.add(owner)
        self.load[owner] = self.load.get(owner, 0) + 1
        self._send(req, owner, msg.StartWalk(req.info, partition, child, step, peers,
                                             imports, remote, fork_dests))

    def _walk_done(self, m: msg.WalkDone) -> None:
        req = self.requests.get(m.request_id)
        if req is None:
            return
        req.received += 1
        self.load[m.worker] = max(0, self.load.get(m.worker, 0) - 1)
        req.outputs_sent[m.worker] = max(req.outputs_sent.get(m.worker, 0), m.outputs_sent)
        for edge, units in m.stream_units.items():
            req.stream_units.setdefault(edge, {})[m.worker] = units
        history = req.walks_done.setdefault((m.partition, m.child), [])
        history.append(m.walk)
        state = RequestState(request_id=m.request_id, params=req.info.params,
                             partition=m.partition, walk=m.walk, child=m.child,
                             walks_done=list(history), store=req.store)
        try:
            nxt = self.model.next_walk(state, {**m.control, **m.results})
        except Exception as exc:
            log.exception("next_walk failed for %s", m.request_id)
            self._end(m.request_id, "error", error=f"next_walk: {exc}", code=500)
            return
        if isinstance(nxt, WalkStep) and nxt.walk not in self.walks:
            self._end(m.request_id, "error", code=500,
                      error=f"next_walk returned walk {nxt.walk!r}, which the model does not "
                            f"declare (its walks: {', '.join(sorted(self.walks))})")
            return
        if isinstance(nxt, WalkStep):
            step = msg.walk_step_msg(nxt)
            problem = _unsendable(step)
            if problem:
                self._end(m.request_id, "error", code=500, error=f"next_walk: {problem}")
                return
            too_many = self._too_many_children(step)
            if too_many:
                self._end(m.request_id, "error", code=400, error=too_many)
                return
            self._dispatch(req, m.partition, m.child, step,
                           self.owner_of(nxt.walk, req.replica))
            self._fail_if_stalled(req)
            return
        if isinstance(nxt, Done) and nxt.reason != "stop":
            req.reason = nxt.reason
            req.child_reasons[m.child] = nxt.reason
        req.lanes.discard((m.partition, m.child))
        if not any(p == m.partition for p, _ in req.lanes):
            self._partition_finished(req, m.partition)
        if not req.lanes:
            self._end(m.request_id, req.reason)
        else:
            self._fail_if_stalled(req)

    def _too_many_children(self, step: msg.WalkStepMsg) -> str | None:
        if step.children <= self.max_children:
            return None
        return (f"walk {step.walk!r} asks for {step.children} children, more than this "
                f"deployment runs at once (max_children={self.max_children})")

    def _send(self, req: ConductorRequest, worker: str, m: msg.Message) -> None:
        req.sent[worker] = req.sent.get(worker, 0) + 1
        self.channel.send(worker, m)

    def _fail_if_stalled(self, req: ConductorRequest) -> None:
        """End the request with a 500 naming what it waits on if it is stalled (see the
        module docstring)."""
        if req.awaiting_input:
            return
        expected = dict(req.sent)  # messages each worker must have handled
        walks_done = 0
        for report in req.blocked.values():
            for dest, count in report.sent.items():
                if dest == "conductor":
                    walks_done += count
                else:
                    expected[dest] = expected.get(dest, 0) + count
        if walks_done != req.received or any(
                w not in req.blocked or req.blocked[w].received != n
                for w, n in expected.items()):
            return
        rid = req.info.request_id
        waits = [w for report in req.blocked.values() for w in report.waits]
        error = (f"request {rid} stalled (nothing runnable, nothing in flight): "
                 + ("; ".join(waits) or "no walk waits on anything"))
        log.error("%s", error)
        self._end(rid, "error", error=error, code=500)

    def _partition_finished(self, req: ConductorRequest, partition: str) -> None:
        for idx, consumer in req.consumers.items():
            if self.partition_of.get(self.edges[idx].src) == partition:
                total = sum(req.stream_units.get(idx, {}).values())
                self._send(req, consumer, msg.StreamEnd(req.info.request_id, idx, total))

    def _end(self, rid: str, reason: str, *, error: str | None = None, code: int = 500) -> None:
        req = self.requests.pop(rid)
        self.router.finished(req.replica)
        for worker in req.workers - set(self.dead_workers):
            self.channel.send(worker, msg.Cancel(rid, reason) if error or reason != "stop"
                              else msg.Release(rid))
        self.channel.send(req.info.frontend, msg.Complete(rid, reason, dict(req.outputs_sent),
                                                          error, code, req.child_reasons))


def _unsendable(step: msg.WalkStepMsg) -> str | None:
    """What of a `next_walk` step cannot travel to a worker (None: all of it can). The
    conductor has no tensor transport: its steps carry host values and result handles, and a
    tensor there (or any object msgpack cannot encode) would fail the send, leaving the
    request waiting on a walk that never starts."""
    try:
        msg.encode(step)
        return None
    except (TypeError, ValueError, OverflowError):
        pass
    for name, value in step.host.items():
        try:
            msg.encode(msg.WalkStepMsg(step.walk, {name: value}))
        except (TypeError, ValueError, OverflowError):
            return (f"input {name!r} of walk {step.walk!r} is a {type(value).__name__}, which "
                    "cannot travel in a control message: a WalkStep from next_walk carries "
                    "host values (numbers, strings, lists, dicts) and handles of walk "
                    "results; a tensor comes from a walk's `results` or from the plan's "
                    "first walks")
    return f"walk {step.walk!r} cannot be sent to a worker (its forks or children)"

