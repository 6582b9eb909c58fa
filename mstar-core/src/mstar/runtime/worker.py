"""A worker: one rank. It runs the walks the conductor starts on it, a cursor per request.

Each loop turn it reads its messages, asks every live cursor which node invocations it
waits on, queues the ready ones in the engines (a request whose stream buffer is full is
paused, others go on; a stream-fed invocation waits for a window), runs one engine step
(engines take turns), and routes the results: outputs back into cursors, client-bound values
to the frontend, stream units to the consumer's worker, control values to the conductor at
walk ends. Loop conditions are evaluated here; per-iteration control never leaves the rank,
nor does a joined walk's (`Join`): its children's rounds, the join node between them and
their re-forks run here, and only the join's end reaches the conductor.

Stalls: whenever a request it holds has nothing runnable, queued or awaited here, the worker
tells the conductor (`Blocked`: what it waits on, and how many of the request's messages it
has handled and sent), once per change; the conductor fails a request that every worker
holding it reports blocked while none of its messages is on its way.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mstar.communication import messages as msg
from mstar.communication.channel import Channel
from mstar.communication.component import Component
from mstar.communication.transport import Transport
from mstar.engine.kv_engine import KVEngine
from mstar.engine.stateless_engine import StatelessEngine
from mstar.engine.work import NodeWork, WorkResult
from mstar.errors import RequestError
from mstar.graph.cursor import Invocation, WalkCursor
from mstar.graph.primitives import GraphNode, Join, StreamingGraphEdge, Walk
from mstar.graph.program import WalkProgram, compile_walk
from mstar.model.contract import Model
from mstar.model.forward import SeqKey
from mstar.model.sampling import SamplingParams
from mstar.runtime.builder import parameter_bytes
from mstar.runtime.chunker import (
    StreamChunker,
    Window,
    first_chunk_of,
    producer_bound,
    slice_emitted,
)
from mstar.runtime.migration import export_sequences, import_sequences, to_wire

log = logging.getLogger(__name__)

STATS_INTERVAL = 0.25  # seconds between WorkerStats reports

Engine = KVEngine | StatelessEngine


@dataclass
class JoinGroup:
    """The children of a joined walk (`Join`) on this worker: the start that made them (its
    forks are applied again each round), the request's environment for the next round,
    the children's environments finished this round, and the join's own lane while it
    runs (keyed as the parent lane: `child`)."""

    start: msg.StartWalk
    base: dict[str, Any]
    children: list[int]
    rounds: int | None
    round: int = 0
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)
    join_lane: Lane | None = None

    @property
    def child(self) -> int:
        return self.start.child


@dataclass
class Lane:
    """One walk of one (partition, child) of a request on this worker."""

    partition: str
    child: int
    walk: str
    cursor: WalkCursor
    in_flight: set[str] = field(default_factory=set)
    window: Window | None = None
    #: the fed window's edge's `rows_per_unit` (how its outputs are cut)
    window_rows: Mapping[str, int] = field(default_factory=dict)
    remote: dict[str, str] = field(default_factory=dict)  # node name -> worker running it
    group: JoinGroup | None = None  # a joined walk's child, or its join


@dataclass(frozen=True)
class RemoteCaller:
    """The lane of a `NodeCall`: the result goes back to the walk's owner."""

    reply_to: str
    call_id: int


@dataclass
class WorkerRequest:
    request_id: str
    info: msg.RequestInfo | None = None
    lanes: dict[tuple[str, int], Lane] = field(default_factory=dict)
    outputs_sent: int = 0
    peers: dict[int, str] = field(default_factory=dict)
    pushed: dict[int, int] = field(default_factory=dict)
    credited: dict[int, int] = field(default_factory=dict)
    chunkers: dict[int, StreamChunker] = field(default_factory=dict)
    #: per streaming edge this worker runs an end of: the request's first window (units)
    first_chunks: dict[int, int | None] = field(default_factory=dict)
    #: per child: the ids `ctx.sample` drew so far at each site (penalties' history)
    site_history: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    producers: dict[int, str] = field(default_factory=dict)
    imported: set[str] = field(default_factory=set)  # KV nodes whose sequences arrived
    calls: dict[int, tuple[Lane, GraphNode]] = field(default_factory=dict)  # NodeCalls out
    pending_starts: list[msg.StartWalk] = field(default_factory=list)  # awaiting imports
    received: int = 0  # messages of the request handled here (`FLOW`)
    sent: dict[str, int] = field(default_factory=dict)  # messages of it sent, by destination
    reported: tuple[int, tuple[tuple[str, int], ...]] | None = None  # at the last Blocked


#: Messages that carry a request's work between components (what `Blocked` counts).
FLOW = (msg.StartWalk, msg.Migrate, msg.StreamEnd, msg.StreamPush, msg.StreamCredit,
        msg.NodeCall, msg.NodeResult, msg.SeqImport)


def host_value(value: Any) -> Any:
    """A value as plain data for control messages (small tensors become lists)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return value


class Worker(Component):
    def __init__(self, rank: int, model: Model, channel: Channel, transport: Transport, *,
                 build_engines: Callable[[], dict[str, Engine]],
                 status_address: str = "frontend", device: torch.device | str = "cpu"):
        """`build_engines` runs on the worker's own thread at start (builds the modules and
        loads the weights), so the rank's torch work stays on one thread. `status_address`:
        where `WorkerStats` go (the frontend in one process, the API server's gateway when
        served); outputs go to each request's own frontend. `device`: the rank's device,
        where tensors taken from the transport are moved."""
        super().__init__(channel.address)
        self.rank = rank
        self.device = torch.device(device)
        self.status_address = status_address
        self.address = channel.address
        self.model = model
        self.engines: dict[str, Engine] = {}
        #: Per node built here: (bytes of its parameters, of those split by tensor
        #: parallelism); see `builder.parameter_bytes`.
        self.parameter_bytes: dict[str, tuple[int, int]] = {}
        self._build_engines = build_engines
        #: The exception that stopped the worker from starting, if any.
        self.startup_error: Exception | None = None
        self.channel = channel
        self.transport = transport
        self.programs: dict[str, WalkProgram] = {
            name: compile_walk(walk) for name, walk in model.graph_walks().items()}
        #: per joined walk: the program of its join (the join node alone)
        self.join_programs: dict[str, WalkProgram] = {
            name: compile_walk(Walk(p.walk.join.node)) for name, p in self.programs.items()
            if p.walk.join is not None}
        self.edges: list[StreamingGraphEdge] = list(model.streaming_edges())
        partition_of = {n: p.name for p in model.partitions() for n in p.nodes}
        self._edge_partitions = [(partition_of.get(e.src), partition_of.get(e.dst))
                                 for e in self.edges]
        self.requests: dict[str, WorkerRequest] = {}
        #: Highest number of stream units any request had in flight to its consumer
        #: (pushed, not yet released): never above the edge's `max_buffered`, or the
        #: request's first window where that is larger (`chunker.producer_bound`).
        self.stream_peak = 0
        self._stats_from: dict[str, int] = {}
        self._call_ids = itertools.count()
        self._report_seq = itertools.count()
        #: Host seconds of the loop turns that stepped an engine, outside the engine
        #: (messages, cursors, submitting, routing results; not idle waits for messages).
        self.loop_seconds = 0.0
        #: This loop turn's `Output`s by frontend, sent at its end (see `_send_outputs`).
        self._outbox: dict[str, list[msg.Output]] = {}
        #: Requests this worker dropped lately: late messages for them are ignored.
        self._gone: collections.OrderedDict[str, None] = collections.OrderedDict()

    # -- lifecycle --------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.engines = self._build_engines()
            self.parameter_bytes = {n: parameter_bytes(e.module) for n, e in self.engines.items()}
        except Exception as exc:
            log.exception("%s failed to start", self.address)
            self.startup_error = exc
            self.channel.send("conductor", msg.WorkerReady(
                self.address, [], error=f"{type(exc).__name__}: {exc}"))
            return
        for engine in self.engines.values():  # a tensor-parallel leader drives followers
            if isinstance(engine, KVEngine) and engine.tp_ranks[:1] == (self.rank,):
                followers = [f"worker:{r}" for r in engine.tp_ranks[1:]]
                engine.mirror = functools.partial(self._send_all, followers)
        #: engines this rank schedules itself (a TP follower's replay the leader's steps)
        self._scheduled = [n for n, e in self.engines.items()
                           if not (isinstance(e, KVEngine) and e.tp_ranks
                                   and e.tp_ranks[0] != self.rank)]
        self._turn = itertools.cycle(self._scheduled)
        self.channel.send("conductor", msg.WorkerReady(self.address, sorted(self.engines)))
        next_stats = 0.0
        while not self.stopping:
            if time.monotonic() >= next_stats:
                self._send_stats()
                next_stats = time.monotonic() + STATS_INTERVAL
            try:
                self._turn_once()
            except Exception as exc:  # a bug must fail requests, not hang the rank
                log.exception("%s: unexpected error; failing its requests", self.address)
                for req in list(self.requests.values()):
                    self._fail(req, RuntimeError(f"{self.address} internal error: {exc}"))

    def _turn_once(self) -> None:
        started = time.perf_counter()
        self._schedule()
        busy = any(e.has_work() for e in self.engines.values())
        waiting = time.perf_counter()
        m = self.channel.recv(timeout=0 if busy else 0.005)
        waited = time.perf_counter() - waiting
        if m is not None:
            while m is not None:
                try:
                    self.handle(m)
                except Exception:  # a bad message must never take the rank down
                    log.exception("%s failed on %s", self.address, type(m).__name__)
                m = self.channel.recv(timeout=0)
            self._schedule()
        self._report_blocked()
        in_engine = self._step()
        self._send_outputs()
        if in_engine is not None:
            self.loop_seconds += time.perf_counter() - started - waited - in_engine

    # -- messages ---------------------------------------------------------------------------
    def _request(self, request_id: str) -> WorkerRequest:
        req = self.requests.get(request_id)
        if req is None:
            req = self.requests[request_id] = WorkerRequest(request_id)
        return req

    def handle(self, m: msg.Message) -> None:
        rid = getattr(m, "request_id", None) or getattr(getattr(m, "info", None),
                                                         "request_id", None)
        if rid in self._gone:
            for h in {**getattr(m, "tensors", {}),
                      **getattr(getattr(m, "step", None), "tensors", {})}.values():
                self.transport.free(h)
            return
        if isinstance(m, msg.StartWalk):
            req = self._request(m.info.request_id)
            if set(m.imports) <= req.imported:
                req.imported -= set(m.imports)
                self._start_walk(m)
            else:
                req.pending_starts.append(m)
        elif isinstance(m, msg.Migrate):
            self._migrate(m)
        elif isinstance(m, msg.TPStep):
            self.engines[m.node].follow(m)
        elif isinstance(m, msg.TPOp):
            self.engines[m.node].apply(m)
        elif isinstance(m, msg.NodeCall):
            self._serve_call(m)
        elif isinstance(m, msg.NodeResult):
            self._call_returned(m)
        elif isinstance(m, msg.SeqImport):
            self._import(m)
        elif isinstance(m, msg.StreamPush):
            req = self._request(m.request_id)
            units = {name: self.transport.get(h) for name, h in m.tensors.items()}
            for h in m.tensors.values():
                self.transport.free(h)
            req.producers[m.edge] = m.producer
            self._chunker(req, m.edge).push(units)
            self._credit(req)  # rows that made no unit are credited at once
        elif isinstance(m, msg.StreamEnd):
            self._chunker(self._request(m.request_id), m.edge).end(m.total_units)
        elif isinstance(m, msg.StreamCredit):
            req = self.requests.get(m.request_id)
            if req is not None:
                req.credited[m.edge] = req.credited.get(m.edge, 0) + m.units
        elif isinstance(m, msg.Cancel | msg.Release):
            self._drop(m.request_id)
        elif isinstance(m, msg.Shutdown):
            self.stop_soon()
        if isinstance(m, FLOW) and (req := self.requests.get(rid)) is not None:
            req.received += 1

    def _send(self, req: WorkerRequest, dest: str, m: msg.Message) -> None:
        """Send one of the request's `FLOW` messages (or its `WalkDone`), counted."""
        req.sent[dest] = req.sent.get(dest, 0) + 1
        self.channel.send(dest, m)

    def _send_all(self, dests: list[str], m: msg.Message) -> None:
        for dest in dests:
            self.channel.send(dest, m)

    def _take(self, tensors: dict[str, msg.Handle]) -> dict[str, Any]:
        values = {name: self.transport.get(h).to(self.device) for name, h in tensors.items()}
        for h in tensors.values():
            self.transport.free(h)
        return values

    def _send_values(self, values: dict[str, Any], request_id: str, dest: str
                     ) -> tuple[dict[str, Any], dict[str, msg.Handle]]:
        host, tensors = {}, {}
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[name] = self.transport.put(value, request_id, owner=dest)
            else:
                host[name] = value
        return host, tensors

    def _serve_call(self, m: msg.NodeCall) -> None:
        """Run a node invocation for a walk owned by another worker."""
        req = self._request(m.info.request_id)
        req.info = req.info or m.info
        caller = RemoteCaller(m.reply_to, m.call_id)
        try:
            node = self.programs[m.walk].nodes[m.node_index]
            if node.name != m.node:
                raise RequestError(f"walk {m.walk!r} has no node {m.node!r} at "
                                   f"{m.node_index}")
            engine = self.engines[node.module]
            info = m.info
            engine.submit(NodeWork(request_id=info.request_id, child=m.child, node=node,
                                   inputs={**m.host, **self._take(m.tensors)},
                                   seed=info.seed, sampling=self._sampling(info, node),
                                   walk=m.walk, iteration=m.iteration, outer=m.outer,
                                   join_round=m.join_round, lane=caller,
                                   site_sampling=info.sampling,
                                   site_history=req.site_history.setdefault(m.child, {})))
        except (RequestError, KeyError, IndexError) as exc:
            self._reply(caller, req, error=exc)

    def _reply(self, caller: RemoteCaller, req: WorkerRequest,
               outputs: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        request_id = req.request_id
        if error is not None:
            code = error.code if isinstance(error, RequestError) else 500
            result = msg.NodeResult(caller.call_id, request_id, error=str(error), code=code)
        else:
            host, tensors = self._send_values(outputs or {}, request_id, caller.reply_to)
            result = msg.NodeResult(caller.call_id, request_id, host, tensors)
        self._send(req, caller.reply_to, result)

    def _call_returned(self, m: msg.NodeResult) -> None:
        req = self.requests.get(m.request_id)
        if req is None or m.call_id not in req.calls:
            for h in m.tensors.values():
                self.transport.free(h)
            return
        lane, node = req.calls.pop(m.call_id)
        outputs = {**m.host, **self._take(m.tensors)}
        if m.error is not None:
            self._fail(req, RequestError(m.error, code=m.code) if m.code < 500
                       else RuntimeError(m.error))
            return
        if req.lanes.get((lane.partition, lane.child)) is lane:
            self._push_streams(req, node, outputs)
            self._complete(req, lane, node, outputs)

    def _migrate(self, m: msg.Migrate) -> None:
        req = self._request(m.request_id)
        engine = self.engines.get(m.node)
        try:
            if not isinstance(engine, KVEngine):
                raise RequestError(f"cannot migrate {m.node!r}: not a KV node on "
                                   f"{self.address}")
            seqs = export_sequences(engine, m.request_id, self.transport, m.dest)
        except (RequestError, RuntimeError) as exc:
            self._fail(req, exc)
            return
        self._send(req, m.dest, msg.SeqImport(m.request_id, m.node, seqs))

    def _import(self, m: msg.SeqImport) -> None:
        req = self._request(m.request_id)
        engine = self.engines.get(m.node)
        try:
            if not isinstance(engine, KVEngine):
                raise RequestError(f"cannot import {m.node!r}: not a KV node on "
                                   f"{self.address}")
            import_sequences(engine, m.request_id, m.seqs, self.transport)
        except (RequestError, KeyError, ValueError, RuntimeError) as exc:  # OutOfPages too
            self._fail(req, exc)
            return
        req.imported.add(m.node)
        for start in list(req.pending_starts):
            if set(start.imports) <= req.imported:
                req.pending_starts.remove(start)
                req.imported -= set(start.imports)
                self._start_walk(start)

    def _chunker(self, req: WorkerRequest, edge: int) -> StreamChunker:
        if edge not in req.chunkers:
            req.chunkers[edge] = StreamChunker(self.edges[edge].policy)
        return req.chunkers[edge]

    def _start_walk(self, m: msg.StartWalk) -> None:
        req = self._request(m.info.request_id)
        req.info = m.info
        req.peers.update(m.stream_peers)
        step = m.step
        group = None
        try:
            if step.walk not in self.programs:
                raise RequestError(f"unknown walk {step.walk!r}")
            join = self.programs[step.walk].walk.join
            if join is not None and m.fork_dests:
                raise RequestError(f"walk {step.walk!r} joins its children on "
                                   f"{self.address}, but forks their KV into a branch "
                                   "placed elsewhere: a joined walk's forks must stay on "
                                   "the worker that runs it", code=500)
            self._fork(req, m)
            tensors = {name: self.transport.get(h) for name, h in step.tensors.items()}
            self._first_windows(req, m.partition)
        except (RequestError, KeyError) as exc:
            self._fail(req, exc)
            return
        for h in step.tensors.values():
            self.transport.free(h)
        base: dict[str, Any] = {**m.info.params, **step.host, **tensors}
        children = list(range(step.children)) if step.children > 1 else [m.child]
        if join is not None:
            try:
                rounds = _join_rounds(join, base)
            except RequestError as exc:
                self._fail(req, exc)
                return
            group = JoinGroup(m, base, children, rounds)
            base[join.round] = 0
        self._start_lanes(req, m.partition, step.walk, children, base, m.remote_nodes, group)

    def _fork(self, req: WorkerRequest, m: msg.StartWalk) -> None:
        """Apply a walk start's forks (again at each round of a joined walk: a fork into an
        existing sequence frees it first, so each round starts from a clean copy)."""
        for i, f in enumerate(m.step.forks):
            engine = self.engines.get(f.node)
            if not isinstance(engine, KVEngine):
                raise RequestError(f"fork of {f.node!r}: not a KV node on {self.address}")
            engine.fork(req.request_id, f)
            dest = m.fork_dests.get(i)
            if dest is not None:  # the branch runs elsewhere: its context moves there
                key = SeqKey(req.request_id, f.node, f.label, f.child)
                transfer = to_wire(engine, engine.export_seq(key), self.transport, dest)
                engine.release_seq(key)
                self._send(req, dest, msg.SeqImport(req.request_id, f.node, [transfer]))

    def _start_lanes(self, req: WorkerRequest, partition: str, walk: str, children: list[int],
                     base: dict[str, Any], remote: Mapping[str, str],
                     group: JoinGroup | None) -> None:
        """A lane per child, each with its own copy of the environment `base`."""
        for child in children:
            lane = Lane(partition, child, walk,
                        WalkCursor(self.programs[walk], {**base, "child": child}),
                        remote=dict(remote), group=group)
            req.lanes[(partition, child)] = lane
            if lane.cursor.done:
                self._walk_done(req, lane)

    def _first_windows(self, req: WorkerRequest, partition: str) -> None:
        """Resolve the request's first window of every active edge with an end in
        `partition` (a bad `first_chunk_param` fails the request here, naming it) and give
        it to the consumer's chunker before any window is cut."""
        for idx, edge in enumerate(self.edges):
            src_part, dst_part = self._edge_partitions[idx]
            if partition not in (src_part, dst_part) or not self._edge_active(req, idx):
                continue
            assert req.info is not None  # set by the StartWalk being handled
            first = req.first_chunks[idx] = first_chunk_of(edge.policy, req.info.params)
            if partition == dst_part:
                self._chunker(req, idx).set_first_chunk(first)

    def _drop(self, request_id: str) -> None:
        self._gone[request_id] = None
        while len(self._gone) > 10_000:
            self._gone.popitem(last=False)
        for engine in self.engines.values():
            engine.release(request_id)
        self.requests.pop(request_id, None)
        self.transport.free_request(request_id)

    def _fail(self, req: WorkerRequest, exc: Exception) -> None:
        code = exc.code if isinstance(exc, RequestError) else 500
        if code >= 500 and not isinstance(exc, RequestError):
            log.exception("request %s failed on %s", req.request_id, self.address,
                          exc_info=exc)
        self.channel.send("conductor", msg.WalkFailed(req.request_id, self.address,
                                                      str(exc) if isinstance(exc, RequestError)
                                                      else f"{type(exc).__name__}: {exc}",
                                                      code, req.outputs_sent))
        self._drop(req.request_id)

    # -- scheduling lanes into engines ------------------------------------------------------
    def _edge_active(self, req: WorkerRequest, idx: int) -> bool:
        src_part, dst_part = self._edge_partitions[idx]
        parts = req.info.partitions if req.info else []
        return src_part in parts and dst_part in parts

    def _schedule(self) -> None:
        """Submit every ready invocation of every request (all of them: a request left
        unscheduled would be reported blocked while it could run)."""
        for req in list(self.requests.values()):
            self._schedule_request(req)

    def _schedule_request(self, req: WorkerRequest) -> None:
        for lane in list(req.lanes.values()):
            if lane.cursor.done or len(lane.in_flight) >= lane.cursor.outstanding():
                continue  # finished, or everything it waits on is running
            for inv in lane.cursor.pending():
                if inv.node.name in lane.in_flight:
                    continue
                ready = self._ready(req, lane, inv)
                if req.request_id not in self.requests:
                    return  # it failed meanwhile
                if ready:
                    self._submit(req, lane, inv)

    def _ready(self, req: WorkerRequest, lane: Lane, inv: Invocation) -> bool:
        node = inv.node
        for idx, edge in enumerate(self.edges):
            if not self._edge_active(req, idx):
                continue
            if edge.src == node.module:
                outstanding = req.pushed.get(idx, 0) - req.credited.get(idx, 0)
                if outstanding >= self._bound(req, idx):
                    return False  # backpressure: this request's producer waits
            if edge.dst == node.name:
                chunker = self._chunker(req, idx)
                window = chunker.next_window()
                if window is None and chunker.ended and edge.policy.continue_after_end:
                    empty = chunker.empty_units()
                    if empty is None:
                        self._fail(req, RuntimeError(
                            f"streaming edge {edge.src}->{edge.dst} ended before any unit "
                            f"was pushed: node {node.name!r} goes on after the end "
                            "(continue_after_end) but no window ever gave it a shape"))
                        return False
                    for src_name, dst_name in edge.tensors.items():
                        lane.cursor.env[dst_name] = empty[src_name]
                    lane.cursor.env[edge.end_flag] = True
                    continue  # an empty window: its outputs are not cut
                if window is None:
                    if chunker.ended:  # nothing left: the loop ends without running
                        lane.cursor.env[edge.end_flag] = True
                        lane.in_flight.add(node.name)
                        self._complete(req, lane, node, {})
                    return False
                for src_name, dst_name in edge.tensors.items():
                    lane.cursor.env[dst_name] = window.units[src_name]
                lane.cursor.env[edge.end_flag] = window.final
                lane.window, lane.window_rows = window, edge.rows_per_unit
        return True

    def _bound(self, req: WorkerRequest, idx: int) -> int:
        """Rows the request's producer on edge `idx` may have in flight before it pauses."""
        policy = self.edges[idx].policy
        return producer_bound(policy, req.first_chunks.get(idx, policy.first_chunk),
                              req.pushed.get(idx, 0))

    def _submit(self, req: WorkerRequest, lane: Lane, inv: Invocation) -> None:
        node = inv.node
        engine = self.engines.get(node.module)
        info = req.info
        if (engine is None and node.name not in lane.remote) or info is None:
            self._fail(req, RuntimeError(f"node {node.module!r} is not on {self.address}"))
            return
        try:
            inputs = lane.cursor.inputs(node.name)  # runs the node's prepare rule
        except Exception as exc:  # the model's rule failed: this request only
            self._fail(req, exc)
            return
        join_round = lane.group.round if lane.group is not None else None
        dest = lane.remote.get(node.name)
        if dest is not None:  # placed on another worker: call it there
            call_id = next(self._call_ids)
            req.calls[call_id] = (lane, node)
            host, tensors = self._send_values(inputs, req.request_id, dest)
            index = next(i for i, n in enumerate(self.programs[lane.walk].nodes) if n is node)
            self._send(req, dest, msg.NodeCall(call_id, info, lane.walk, node.name, index,
                                               lane.child, inv.iteration, self.address,
                                               host, tensors, inv.loop_path[:-1],
                                               join_round))
            lane.in_flight.add(node.name)
            return
        work = NodeWork(request_id=req.request_id, child=lane.child, node=node,
                        inputs=inputs, seed=info.seed, sampling=self._sampling(info, node),
                        walk=lane.walk, iteration=inv.iteration, outer=inv.loop_path[:-1],
                        join_round=join_round, lane=lane,
                        site_sampling=info.sampling,
                        site_history=req.site_history.setdefault(lane.child, {}))
        try:
            engine.submit(work)
        except RequestError as exc:
            self._fail(req, exc)
            return
        lane.in_flight.add(node.name)

    @staticmethod
    def _sampling(info: msg.RequestInfo, node: GraphNode) -> SamplingParams:
        return info.sampling.get(node.name) or info.sampling.get("default") \
            or SamplingParams()

    # -- results ----------------------------------------------------------------------------
    def _step(self) -> float | None:
        """One engine step (engines take turns) and its results routed; the seconds spent
        inside the engine, None when no engine had work."""
        for _ in range(len(self._scheduled)):
            engine = self.engines[next(self._turn)]
            if engine.has_work():
                started = time.perf_counter()
                results = engine.step()
                in_engine = time.perf_counter() - started
                for result in results:
                    self._on_result(result)
                return in_engine
        return None

    def _on_result(self, result: WorkResult) -> None:
        work = result.work
        if isinstance(work.lane, RemoteCaller):
            if work.request_id in self.requests:
                self._reply(work.lane, self.requests[work.request_id], result.outputs,
                            result.error)
            return
        req = self.requests.get(work.request_id)
        lane: Lane = work.lane
        if req is None or req.lanes.get((lane.partition, lane.child)) is not lane:
            return  # cancelled meanwhile
        if result.error is not None:
            self._fail(req, result.error)
            return
        outputs = result.outputs
        if lane.window is not None:
            window, lane.window = lane.window, None
            if (window.emit_start, window.emit_end) != (window.win_start, window.win_end):
                # (a window emitting all its units leaves outputs whole: a KV consumer's
                # sampled token is one row whatever the window's size)
                outputs = {k: slice_emitted(v, window, rows_per_unit=lane.window_rows.get(k))
                           if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}
            self._credit(req)
        self._push_streams(req, work.node, outputs)
        self._complete(req, lane, work.node, outputs)

    def _credit(self, req: WorkerRequest) -> None:
        for idx, chunker in req.chunkers.items():
            freed = chunker.release()
            if freed and idx in req.producers:
                self._send(req, req.producers[idx], msg.StreamCredit(req.request_id, idx, freed))

    def _push_streams(self, req: WorkerRequest, node: GraphNode, outputs: dict[str, Any]) -> None:
        for idx, edge in enumerate(self.edges):
            if edge.src != node.module or not self._edge_active(req, idx):
                continue
            if not all(name in outputs for name in edge.tensors):
                continue
            peer = req.peers.get(idx)
            if peer is None:
                continue
            units = {name: outputs[name] for name in edge.tensors}
            rows = int(next(iter(units.values())).shape[0])
            handles = {name: self.transport.put(t, req.request_id, owner=peer)
                       for name, t in units.items()}
            self._send(req, peer, msg.StreamPush(req.request_id, idx, self.address, handles,
                                                 rows))
            req.pushed[idx] = req.pushed.get(idx, 0) + rows
            self.stream_peak = max(self.stream_peak,
                                   req.pushed[idx] - req.credited.get(idx, 0))

    def _emit(self, req: WorkerRequest, child: int, values: dict[str, Any]) -> None:
        if not values:
            return
        assert req.info is not None  # a lane exists only once its StartWalk brought the info
        frontend = req.info.frontend
        host, tensors = self._send_values(values, req.request_id, frontend)
        self._outbox.setdefault(frontend, []).append(
            msg.Output(req.request_id, self.address, req.outputs_sent, child, host, tensors))
        req.outputs_sent += 1

    def _send_outputs(self) -> None:
        """This turn's outputs, one `Outputs` per frontend: a decode step's tokens travel
        together (one encode, one hand-off, one wake-up of the frontend), not one message
        per sequence."""
        if self._outbox:
            outbox, self._outbox = self._outbox, {}
            for frontend, items in outbox.items():
                self.channel.send(frontend, msg.Outputs(items))

    def _complete(self, req: WorkerRequest, lane: Lane, node: GraphNode,
                  outputs: dict[str, Any]) -> None:
        lane.in_flight.discard(node.name)
        emitted = {name: outputs[name] for name in node.emit if name in outputs}
        if "token_ids" in emitted and "logprobs" in outputs:
            emitted["logprobs"] = outputs["logprobs"]
        self._emit(req, lane.child, emitted)
        lane.cursor.complete(node.name, outputs)
        if lane.cursor.done:
            self._walk_done(req, lane)

    def _walk_done(self, req: WorkerRequest, lane: Lane) -> None:
        group = lane.group
        if group is not None and lane is not group.join_lane:
            del req.lanes[(lane.partition, lane.child)]
            group.finished[lane.child] = lane.cursor.env
            if len(group.finished) == len(group.children):
                self._join(req, lane, group)
            return
        if group is not None:
            try:
                ends = self._join_ends(group, lane.cursor.env)
            except Exception as exc:  # the model's `until` failed: this request only
                self._fail(req, exc)
                return
            if not ends:
                self._next_round(req, lane, group)
                return
        walk = self.programs[lane.walk].walk
        env = lane.cursor.env
        self._emit(req, lane.child, {n: env[n] for n in walk.emit if n in env})
        control = {n: host_value(env[n]) for n in walk.control if n in env}
        results = {n: self.transport.put(env[n], req.request_id)
                   for n in walk.results if isinstance(env.get(n), torch.Tensor)}
        del req.lanes[(lane.partition, lane.child)]
        self._send(req, "conductor", msg.WalkDone(
            req.request_id, lane.partition, lane.walk, lane.child, self.address, control,
            results, req.outputs_sent, dict(req.pushed)))

    # -- joined walks (`Join`) ---------------------------------------------------------------
    def _join(self, req: WorkerRequest, last: Lane, group: JoinGroup) -> None:
        """Every child of the round has finished: run the join node once, over their stacked
        values, as the parent's lane."""
        walk = last.walk
        join = self.programs[walk].walk.join
        assert join is not None
        envs = [group.finished[c] for c in group.children]
        group.finished = {}
        env = dict(group.base)
        for name in join.stack:
            values = [e.get(name) for e in envs]
            try:
                if any(v is None for v in values):
                    raise ValueError("a child ended without it")
                env[name] = (torch.stack(values) if isinstance(values[0], torch.Tensor)
                             else values)
            except (ValueError, RuntimeError, TypeError) as exc:  # this request only
                self._fail(req, RuntimeError(f"walk {walk!r}: its join cannot stack the "
                                             f"children's {name!r}: {exc}"))
                return
        lane = Lane(last.partition, group.child, walk,
                    WalkCursor(self.join_programs[walk], env), remote=last.remote, group=group)
        group.join_lane = lane
        req.lanes[(lane.partition, lane.child)] = lane
        if lane.cursor.done:  # the join node skipped itself
            self._walk_done(req, lane)

    def _join_ends(self, group: JoinGroup, env: dict[str, Any]) -> bool:
        """Whether the round just joined is the last (`Join.until`, `Join.times`)."""
        group.round += 1
        until = self.programs[group.start.step.walk].walk.join.until  # type: ignore[union-attr]
        if until is not None and (bool(env.get(until, False)) if isinstance(until, str)
                                  else bool(until(env))):
            return True
        return group.round == group.rounds

    def _next_round(self, req: WorkerRequest, lane: Lane, group: JoinGroup) -> None:
        """The join goes on: its fed outputs into the request's environment, every child's
        KV forked afresh from the kept context, and every child's walk started again."""
        del req.lanes[(lane.partition, lane.child)]
        group.join_lane = None
        join = self.programs[lane.walk].walk.join
        assert join is not None
        env = lane.cursor.env
        group.base.update({inp: env[out] for out, inp in join.feed_map().items() if out in env})
        group.base[join.round] = group.round
        try:
            self._fork(req, group.start)
        except (RequestError, KeyError) as exc:
            self._fail(req, exc)
            return
        self._start_lanes(req, lane.partition, lane.walk, group.children, group.base,
                          lane.remote, group)

    # -- stalls -----------------------------------------------------------------------------
    def _report_blocked(self) -> None:
        """`Blocked` for each request with nothing runnable, queued in an engine or awaited
        from another worker here (called right after scheduling), unless nothing changed
        since its last report: only a message can make such a request runnable again."""
        queued: set[str] | None = None  # built only if some request has nothing running
        for req in self.requests.values():
            if req.calls or any(lane.in_flight for lane in req.lanes.values()):
                continue
            if queued is None:
                queued = {t.request_id for e in self.engines.values() for t in e.waiting}
            if req.request_id in queued:
                continue
            signature = (req.received, tuple(sorted(req.sent.items())))
            if signature == req.reported:
                continue
            req.reported = signature
            self.channel.send("conductor", msg.Blocked(
                req.request_id, self.address, next(self._report_seq), req.received,
                dict(req.sent), self._waits(req)))

    def _waits(self, req: WorkerRequest) -> list[str]:
        """What the request's walks here wait on, in words."""
        waits = [f"walk '{s.step.walk}' waits for the KV of "
                 f"{', '.join(sorted(set(s.imports) - req.imported))} to arrive"
                 for s in req.pending_starts]
        for lane in req.lanes.values():
            for inv in lane.cursor.pending():
                node = inv.node
                for idx, edge in enumerate(self.edges):
                    if not self._edge_active(req, idx):
                        continue
                    where = f"walk '{lane.walk}' node '{node.name}'"
                    route = f"streaming edge {edge.src}->{edge.dst}"
                    outstanding = req.pushed.get(idx, 0) - req.credited.get(idx, 0)
                    bound = self._bound(req, idx)
                    if edge.src == node.module and outstanding >= bound:
                        waits.append(f"{where} is paused for credits on {route} ({outstanding} "
                                     f"rows not credited back, bound {bound})")
                    if edge.dst == node.name:
                        chunker = self._chunker(req, idx)
                        if chunker.ended and edge.policy.continue_after_end:
                            continue  # runnable: it goes on with empty windows
                        waits.append(f"{where} waits on {route} ({chunker.pushed} units "
                                     f"pushed, the next window needs {chunker.needed})")
        return waits

    # -- introspection (tests, metrics) -----------------------------------------------------
    def _send_stats(self) -> None:
        steps: dict[str, float] = {}
        for name, engine in self.engines.items():
            since = self._stats_from.get(name, 0)
            fresh = [r.seconds for r in itertools.takewhile(  # newest first, only new ones
                lambda r, since=since: r.step >= since, reversed(engine.step_log))]
            if fresh:
                steps[name] = sum(fresh) / len(fresh)
                self._stats_from[name] = engine.step_log[-1].step + 1
        waiting = sum(len(e.waiting) for e in self.engines.values())
        self.channel.send(self.status_address, msg.WorkerStats(
            self.address, self.pages_in_use(), len(self.requests), waiting, steps,
            self.counters(), self.invocations(), self.parameter_bytes, time.time(),
            self.node_pages()))

    def counters(self) -> dict[str, int]:
        """Every engine's cumulative counters, as "<node>.<name>", with
        "<node>.node_invocations" per graph node (walks summed)."""
        out = {f"{node}.{name}": value for node, engine in self.engines.items()
               for name, value in engine.counters.items()}
        for node, walks in self.invocations().items():
            out[f"{node}.node_invocations"] = sum(walks.values())
        return out

    def invocations(self) -> dict[str, dict[str, int]]:
        """Node invocations this rank ran: graph node -> walk -> count."""
        out: dict[str, dict[str, int]] = {}
        for engine in self.engines.values():
            for (node, walk), count in engine.invocations.items():
                out.setdefault(node, {})[walk] = count
        return out

    def node_pages(self) -> dict[str, int]:
        """Pages each KV node built here holds (each has its own pool)."""
        return {n: e.pages_in_use() for n, e in self.engines.items() if isinstance(e, KVEngine)}

    def pages_in_use(self) -> int:
        return sum(self.node_pages().values())


def _join_rounds(join: Join, env: Mapping[str, Any]) -> int | None:
    """A join's `times` resolved against the request's environment (None: only `until`)."""
    times = join.times
    if isinstance(times, str):
        if times not in env:
            raise RequestError(f"the join's rounds ({times!r}) are missing from the request",
                               code=500)
        value = env[times]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RequestError(f"{times} must be a positive integer, got {value!r}",
                               param=times)
        return value
    return times
