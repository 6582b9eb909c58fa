"""The control messages between the API server's gateway, the frontends (data workers),
the conductor and the workers.

Everything that crosses a component boundary is one of these msgspec structs, encoded to
bytes (msgpack), even inside one process: going multi-process swaps the channel, not the
messages. Tensors never travel here; they travel through a transport and are named by a
`Handle`. Host values (ints, floats, strings, lists, dicts) travel in `host` dicts, tensor
handles in `tensors` dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from mstar.events import TensorData
from mstar.model.contract import Fork, WalkStep
from mstar.model.sampling import SamplingParams


class Handle(msgspec.Struct, frozen=True):
    """A tensor held by a transport: `key` in the store of `owner`, for `request_id`; a
    small one travels in `inline` instead (its raw bytes; see `tensor_bytes`)."""

    key: str
    owner: str
    request_id: str
    dtype: str
    shape: list[int]
    inline: bytes | None = None


class WalkStepMsg(msgspec.Struct):
    walk: str
    host: dict[str, Any] = {}
    tensors: dict[str, Handle] = {}
    forks: list[Fork] = []
    children: int = 1


def walk_step_msg(step: WalkStep, put: Callable[[Any], Handle] | None = None) -> WalkStepMsg:
    """A model's WalkStep as a message: handles stay handles, tensors go through `put`
    (the transport) and become handles, anything else is host data."""
    host: dict[str, Any] = {}
    tensors: dict[str, Handle] = {}
    for name, value in step.inputs.items():
        if isinstance(value, Handle):
            tensors[name] = value
        elif put is not None and hasattr(value, "dtype") and hasattr(value, "shape"):
            tensors[name] = put(value)
        else:
            host[name] = value
    return WalkStepMsg(step.walk, host, tensors, list(step.forks), step.children)


class RequestInfo(msgspec.Struct):
    """What every worker needs to know about a request it runs part of. `frontend`: the
    address of the frontend that owns the request (its outputs and its end go there)."""

    request_id: str
    params: dict[str, Any]
    sampling: dict[str, SamplingParams]
    seed: int
    partitions: list[str]
    frontend: str = "frontend"


# -- API server (gateway) <-> data worker (frontend) --------------------------------------
class ClientRequest(msgspec.Struct, tag=True):
    """A request body (JSON) for a data worker's frontend. `kind`: "generate" (the model's
    native request), "completion" (a text prompt), "chat" (messages, see `mstar.chat`) or
    "transcription" (an audio file, `blobs[0]`, and the transcription fields);
    `blobs`: the raw media bytes the body's media parts refer to by index."""

    request_id: str
    body_json: bytes
    kind: str = "generate"
    blobs: list[bytes] = []


class ClientCancel(msgspec.Struct, tag=True):
    request_id: str
    reason: str = "abort"


class ClientEvent(msgspec.Struct, tag=True):
    """One `mstar.events` event of a request (msgspec-encoded), data worker -> gateway; the
    last one of a request is `Finished` or `Error`."""

    request_id: str
    event: bytes


# -- frontend -> conductor ----------------------------------------------------------------
class Submit(msgspec.Struct, tag=True):
    info: RequestInfo
    first_walks: dict[str, WalkStepMsg]
    prompt_tokens: int = 0
    timeout: float | None = None


class CancelRequest(msgspec.Struct, tag=True):
    request_id: str
    reason: str = "abort"


class Shutdown(msgspec.Struct, tag=True):
    pass


class WorkerDied(msgspec.Struct, tag=True):
    """A worker process is gone (launcher -> conductor): its requests fail."""

    address: str
    message: str


# -- conductor -> worker ------------------------------------------------------------------
class StartWalk(msgspec.Struct, tag=True):
    info: RequestInfo
    partition: str
    child: int
    step: WalkStepMsg
    #: streaming edge index -> address of the worker at the other end (consumer for edges
    #: this partition produces, producer for edges it consumes)
    stream_peers: dict[int, str] = {}
    #: KV nodes whose sequences arrive by `SeqImport` before the walk may start
    imports: list[str] = []
    #: graph nodes of this walk placed on other workers (name -> address): `NodeCall`s
    remote_nodes: dict[str, str] = {}
    #: forks (index in step.forks) whose new sequence lives on another worker
    fork_dests: dict[int, str] = {}


class Migrate(msgspec.Struct, tag=True):
    """Send the request's sequences of `node` to `dest` (the next walk runs there)."""

    request_id: str
    node: str
    dest: str


class StreamEnd(msgspec.Struct, tag=True):
    request_id: str
    edge: int
    total_units: int


class Cancel(msgspec.Struct, tag=True):
    request_id: str
    reason: str = "abort"


class Release(msgspec.Struct, tag=True):
    """The request is over: free everything it holds on this worker."""

    request_id: str


# -- worker -> conductor ------------------------------------------------------------------
class WorkerReady(msgspec.Struct, tag=True):
    address: str
    nodes: list[str]
    error: str | None = None


class WalkDone(msgspec.Struct, tag=True):
    request_id: str
    partition: str
    walk: str
    child: int
    worker: str
    control: dict[str, Any] = {}
    results: dict[str, Handle] = {}
    outputs_sent: int = 0
    stream_units: dict[int, int] = {}


class WalkFailed(msgspec.Struct, tag=True):
    request_id: str
    worker: str
    message: str
    code: int = 500
    outputs_sent: int = 0


class Blocked(msgspec.Struct, tag=True):
    """The worker holds the request but has nothing of it to run, queued or awaited from
    another worker. `received`: the request's messages it has handled; `sent`: those it
    has sent, by destination (the conductor compares them across workers to see whether
    any is still on its way); `waits`: what its walks wait on, in words. `seq` orders a
    worker's reports."""

    request_id: str
    worker: str
    seq: int
    received: int
    sent: dict[str, int] = {}
    waits: list[str] = []


class WorkerStats(msgspec.Struct, tag=True):
    """A worker's gauges, sent a few times a second to where status goes (the frontend in
    one process, the API server's gateway when served): metrics, leak checks.
    `step_seconds`: mean forward time per node since the last report; `counters`: the
    engines' cumulative counts as "<node>.<name>" (`LLM.prefix_cache_hit_tokens`,
    `vision_encoder.encoder_cache_hits`, ...); `invocations`: node invocations this rank
    ran, by graph node (branch nodes by their own name) and walk; `parameter_bytes`: per
    node held, [all its parameters, those of them split across a tensor-parallel group];
    `at`: the wall-clock time (`time.time()`) the counts were read; `node_pages`: per KV
    node, the pages it holds of its own pool (`pages_in_use` is their sum)."""

    address: str
    pages_in_use: int
    requests: int
    waiting: int
    step_seconds: dict[str, float] = {}
    counters: dict[str, int] = {}
    invocations: dict[str, dict[str, int]] = {}
    parameter_bytes: dict[str, tuple[int, int]] = {}
    at: float = 0.0
    node_pages: dict[str, int] = {}


# -- worker -> frontend -------------------------------------------------------------------
class Output(msgspec.Struct):
    """Client-bound values of one node invocation (or one walk's end); sent in `Outputs`."""

    request_id: str
    worker: str
    seq_no: int
    child: int
    host: dict[str, Any] = {}
    tensors: dict[str, Handle] = {}


class Outputs(msgspec.Struct, tag=True):
    """A worker's `Output`s for one frontend, in order: one message per engine step instead
    of one per sequence (each costs an encode, a hand-off and a wake-up of the frontend)."""

    items: list[Output]


# -- conductor -> frontend ----------------------------------------------------------------
class Complete(msgspec.Struct, tag=True):
    """The request ended. The frontend finishes it once it holds `outputs_expected`
    outputs from each worker (outputs travel on another path and may arrive later)."""

    request_id: str
    reason: str
    outputs_expected: dict[str, int] = {}
    error: str | None = None
    code: int = 500
    reasons: dict[int, str] = {}  # by child, where its lanes ended for another reason


class Rejected(msgspec.Struct, tag=True):
    request_id: str
    message: str
    code: int = 429


# -- worker <-> worker --------------------------------------------------------------------
class StreamPush(msgspec.Struct, tag=True):
    request_id: str
    edge: int
    producer: str
    tensors: dict[str, Handle]
    units: int


class NodeCall(msgspec.Struct, tag=True):
    """Run one node invocation of a walk owned elsewhere (a CFG branch on its own rank);
    the result goes back to `reply_to` as a `NodeResult`. `node_index` is the node's place
    in the walk's program order: one branch name may appear in several stages of a walk
    (a guidance context prefilled at the start, then run in every step), each with its own
    outputs."""

    call_id: int
    info: RequestInfo
    walk: str
    node: str
    node_index: int
    child: int
    iteration: int | None
    reply_to: str
    host: dict[str, Any] = {}
    tensors: dict[str, Handle] = {}
    outer: tuple[int, ...] = ()  # the noise key's other parts (`NodeWork`)
    join_round: int | None = None


class NodeResult(msgspec.Struct, tag=True):
    call_id: int
    request_id: str
    host: dict[str, Any] = {}
    tensors: dict[str, Handle] = {}
    error: str | None = None
    code: int = 500


class TPSeq(msgspec.Struct):
    """One sequence's part of a tensor-parallel step, as the leader scheduled it."""

    request_id: str
    label: str
    child: int
    take: int
    context_len: int
    segments: list[tuple[int, str]]
    mode: str
    is_last: bool
    outputs: dict[str, tuple[int, int]]
    seed: int
    iteration: int | None = None
    #: The invocation this chunk ends ((graph node, walk)), for the follower's counters;
    #: None for a chunk that does not end one (or a rebuild after preemption).
    ends: tuple[str, str] | None = None
    first: bool = False  # the chunk starts its sequence (counted as prompt tokens computed)
    outer: tuple[int, ...] = ()  # the noise key's other parts (`NodeWork`)
    join_round: int | None = None
    #: Cached pages the leader's prefix cache gave the sequence before this chunk (the
    #: follower adopts the same ones: it holds the same K/V shard under the same ids).
    adopted: list[int] = []
    #: The sequence's page table from page `context_len // page_size` on, after the
    #: leader's reservation: the follower takes exactly these (new and copy-on-write).
    pages: list[int] = []
    #: Prefix-cache hashes of the sequence's full pages: after the step the follower
    #: registers pages `register_from`.. under them, as the leader does.
    hashes: list[bytes] = []
    register_from: int = 0


class TPStep(msgspec.Struct, tag=True):
    """Leader -> followers of a tensor-parallel node: run this batch on your shard (the
    collectives inside the forward keep the ranks in step)."""

    node: str
    seqs: list[TPSeq]
    input_ids: TensorData
    positions: TensorData
    extras: dict[str, TensorData] = {}


class TPOp(msgspec.Struct, tag=True):
    """Leader -> followers: a cache operation outside a step, so page tables stay equal.
    kind: "fork" (with `fork`), "reset" (a preempted sequence), "free", "release",
    "export" (the sequence's K/V shard to the leader, a collective: it leaves the group)
    and "import" (`length` tokens of K/V arrive into the leader's `pages`, the follower's
    shard by a collective from the leader)."""

    node: str
    kind: str
    request_id: str
    label: str = "main"
    child: int = 0
    fork: Fork | None = None
    pages: list[int] = []
    length: int = 0


class ChunkMsg(msgspec.Struct):
    """A sequence's appended tokens (its history) by handle."""

    input_ids: Handle
    positions: Handle
    segments: list[tuple[int, str]]
    token_extras: dict[str, Handle] = {}
    seq_extras: dict[str, Handle] = {}


class SeqTransfer(msgspec.Struct):
    """One sequence moving between workers: its K/V, history and sampling state."""

    label: str
    child: int
    kv: Handle | None
    history: ChunkMsg | None
    next_position: int
    appended_ids: list[int]
    sampled: list[tuple[int, int]]


class SeqImport(msgspec.Struct, tag=True):
    request_id: str
    node: str
    seqs: list[SeqTransfer]


class StreamCredit(msgspec.Struct, tag=True):
    request_id: str
    edge: int
    units: int


Message = (ClientRequest | ClientCancel | ClientEvent
           | Submit | CancelRequest | Shutdown | WorkerDied | StartWalk | Migrate | StreamEnd | Cancel | Release
           | WorkerReady | WorkerStats | WalkDone | WalkFailed | Blocked | Outputs | Complete | Rejected | StreamPush
           | SeqImport | NodeCall | NodeResult | TPStep | TPOp | StreamCredit)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> Message:
    return _decoder.decode(data)
