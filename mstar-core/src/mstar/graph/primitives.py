"""Graph primitives a model builds its walks from.

A walk is a small program over graph nodes: `Sequential` runs items in order, `Parallel`
runs branches on the same inputs (a branch may be skipped per request or per iteration),
`Loop` repeats its body with carried values. These objects are declarations only: walks are
compiled to a flat instruction list (`mstar.graph.program`) and executed by a per-request
cursor in the worker, never by a recursive interpreter, so one engine step can batch
requests that stand at different places of different walks.

Values flow by name: every request has an environment (name -> tensor or small host value);
a node reads its `inputs` from it and writes its `outputs` back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: A skip rule sees the request's environment (host values and tensors) and the loop
#: iteration (or None outside loops) and returns True to skip the branch this time.
SkipRule = Callable[[Mapping[str, Any], int | None], bool]
#: A prepare rule sees the same and returns values for this invocation only (read over the
#: environment; never written into it).
PrepareRule = Callable[[Mapping[str, Any], int | None], dict[str, Any]]


@dataclass(frozen=True)
class GraphNode:
    """One invocation of a node (a submodule placed by the config).

    `alias_of` makes a branch node: it shares the target's module and weights but keeps its
    own KV `label` (CFG branches: `GraphNode("LLM_uncond", alias_of="LLM", label="uncond")`).
    `inputs` / `outputs` name environment values. `rename` maps this node's output names to
    environment names (so two branches of one module can write `velocity` and
    `velocity_uncond`). `emit` names outputs sent to the client side (postprocess) each time
    the node runs. `skip` makes it skippable inside a `Parallel`; a skipped node's outputs
    (after `rename`) leave the environment, so a later node sees them absent, not a previous
    iteration's values (CFG outside its interval).

    `prepare` computes per-invocation values (positions, segments...) when the node is about
    to run. They are local to this invocation: its `inputs` are read from them first, then
    from the environment, and no other node (another branch of the same `Parallel`, a later
    stage) sees them, so two CFG branches can each take their own positions. A value a
    later node needs must be an output.
    """

    name: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    alias_of: str | None = None
    label: str = "main"
    rename: Mapping[str, str] = field(default_factory=dict)
    emit: tuple[str, ...] = ()
    skip: SkipRule | None = None
    prepare: PrepareRule | None = None

    @property
    def module(self) -> str:
        """The node whose module and weights run this invocation."""
        return self.alias_of or self.name


@dataclass(frozen=True)
class Sequential:
    items: tuple[WalkItem, ...]

    def __init__(self, *items: WalkItem):
        object.__setattr__(self, "items", tuple(items))


@dataclass(frozen=True)
class Parallel:
    """Branches that may run concurrently (batched together when co-located).

    Branches are `GraphNode`s; a branch whose `skip` rule says so does not run (CFG scale 1,
    outside the CFG interval).
    """

    branches: tuple[GraphNode, ...]

    def __init__(self, *branches: GraphNode):
        object.__setattr__(self, "branches", tuple(branches))


@dataclass(frozen=True)
class Loop:
    """Repeat `body` `times` times (an int, or the name of a request value) or `until` a
    condition holds (the name of a boolean environment value, or a callable of the
    environment), whichever comes first. `carry` maps a body output to the input it feeds
    next iteration (a list means same-named); carried values stay on the owner's device, are
    keyed by (request, loop) so branches share them, and migrate with the request.

    `iteration` names the environment value holding the 0-based iteration (for noise keys
    and timesteps). The condition is checked after each iteration; `times` of 0 runs nothing.
    """

    body: WalkItem
    times: int | str | None = None
    until: str | Callable[[Mapping[str, Any]], bool] | None = None
    carry: Mapping[str, str] | Sequence[str] = ()
    iteration: str = "iteration"

    def carry_map(self) -> dict[str, str]:
        if isinstance(self.carry, Mapping):
            return dict(self.carry)
        return {name: name for name in self.carry}


WalkItem = GraphNode | Sequential | Parallel | Loop


@dataclass(frozen=True)
class Join:
    """Join a walk's children in one node invocation per round, on the worker that runs them.

    A walk started with `WalkStep(children=N, forks=...)` runs one lane per child. With a
    `join`, when every child's lane has finished, `node` (a stateless node) runs once and
    sees, in its environment: each name of `stack` gathered from the children in child order
    (tensors `torch.stack`ed along a new dim 0, host values as a list), plus the request's
    environment (its params and the step's inputs, the previous round's `feed` values) and
    `round` (the 0-based round). Its outputs are written into that join environment. Then,
    on that worker, without a round trip through the conductor:

    - the join ends when `until` holds (the name of a boolean join value, or a callable of
      the join environment) or `times` rounds ran (an int or the name of a request value):
      the walk then ends once for the parent lane: its `emit`, `control` and `results` are
      read from the join environment (the children's own walk ends report nothing);
    - otherwise every child starts the walk body again: the step's `forks` are applied again
      (a fork into an existing sequence first frees it, so each child re-forks a clean copy
      of the kept context, e.g. `Fork(node, label="cand", child=c, src_label="ctx")`), and
      each child's environment is the request's plus the join's `feed` outputs (output name
      -> input name; a list means same-named) and `round` + 1.

    Why a walk option run by the children's worker rather than a conductor step: the
    children and their forked KV already live on that worker, their stacked outputs are
    tensors (the conductor never holds one), and a CEM refit per round then costs one node
    invocation and no message per child. Children of a round run concurrently (batched in
    the engines); noise drawn inside them is keyed by the round too (`ctx.randn`), so every
    round draws fresh samples. A joined walk's forks must stay on that worker (no fork
    into a branch placed elsewhere); `node` may be placed anywhere (a remote call).
    """

    node: GraphNode
    stack: tuple[str, ...] = ()
    feed: Mapping[str, str] | Sequence[str] = ()
    until: str | Callable[[Mapping[str, Any]], bool] | None = None
    times: int | str | None = None
    round: str = "join_round"

    def feed_map(self) -> dict[str, str]:
        if isinstance(self.feed, Mapping):
            return dict(self.feed)
        return {name: name for name in self.feed}


@dataclass(frozen=True)
class Walk:
    """A named execution plan: its body and the outputs reported at its end.

    `control` names small host values sent to the conductor when the walk ends (sampled ids,
    finish reason; at most 4 KiB per request); `results` names tensors kept on the worker
    and reported to the conductor by handle so the next walk can consume them; `emit`
    names values sent to the client side (postprocess) when the walk ends (a denoised
    action chunk, a final latent). `join` runs the walk's children in rounds joined by one
    node invocation (`Join`; CEM planning); the walk's outputs then come from the join.
    """

    body: WalkItem
    control: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    emit: tuple[str, ...] = ()
    join: Join | None = None


@dataclass(frozen=True)
class GraphEdge:
    """A plain edge: `tensors` of node `src` feed node `dst` (possibly on another rank)."""

    src: str
    dst: str
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChunkPolicy:
    """How a streaming edge cuts a growing sequence of units (rows along dim 0) into windows.

    Emission boundaries are e0 = 0, e1 = `first_chunk`, e(k+1) = e(k) + `hop`. The window for
    emitting units [e(k), e(k+1)) spans input units [e(k) - left, e(k+1) + lookahead),
    clipped to what exists, where left = `emit[0]` and lookahead = `window` - `emit[1]`; it is
    ready once e(k+1) + lookahead units exist or the stream has ended. At end of stream the
    remaining units are flushed with whatever context exists, so every input unit's output
    is emitted exactly once. `emit[1] - emit[0]` must equal `hop`.

    `first_chunk_param` names a request param (`RequestPlan.params[name]`, a positive int)
    that sets e1 per request instead of `first_chunk` (a Talker whose prefill needs all of
    its prompt's rows at once, a length known only per request). While a request's first
    window has not formed, its producer may push up to that window's units even past
    `max_buffered` (bounded by the request's own first window), so backpressure cannot
    deadlock it.

    `continue_after_end`: once the stream ended and every unit was emitted, the consumer
    node is still invoked, each time with empty windows (0 rows, the stream's trailing
    shape and dtype) and the end flag True, until its own loop ends (a Talker that keeps
    speaking after the Thinker stopped). Without it the consumer's loop gets no further
    invocation (the node completes without outputs, the end flag True).
    """

    window: int
    hop: int
    emit: tuple[int, int]
    first_chunk: int | None = None
    max_buffered: int = 64
    #: Optional: makes, per request, the object that turns the producer's rows into the
    #: units windows are cut from (`mstar.runtime.chunker.UnitAssembler`: e.g. seven
    #: audio codes into one codec frame, dropping invalid ones). `max_buffered` bounds the
    #: producer's rows in flight: one per unit the consumer holds, plus rows not yet
    #: received (rows that made no unit are credited at once); `window`, `hop`, `emit`
    #: count units.
    assemble: Callable[[], Any] | None = None
    first_chunk_param: str | None = None
    continue_after_end: bool = False

    def __post_init__(self):
        start, end = self.emit
        if not (0 <= start < end <= self.window):
            raise ValueError(f"emit range {self.emit} must satisfy 0 <= start < end <= window")
        if end - start != self.hop:
            raise ValueError(f"emit range {self.emit} must span hop={self.hop} units")
        if self.first_chunk is not None and self.first_chunk <= 0:
            raise ValueError("first_chunk must be positive")
        if self.max_buffered < self.units_per_window:
            raise ValueError(
                f"max_buffered={self.max_buffered} cannot hold a window: a window needs up "
                f"to {self.units_per_window} units held at once, so the producer would pause "
                "before any window could form")

    @property
    def units_per_window(self) -> int:
        """The most units the consumer holds when a window becomes ready: the first one's
        `first_chunk` (else `hop`) plus lookahead, every later one's `window` at most."""
        return max(self.window, (self.first_chunk or self.hop) + self.lookahead)

    @property
    def left(self) -> int:
        return self.emit[0]

    @property
    def lookahead(self) -> int:
        return self.window - self.emit[1]


@dataclass(frozen=True)
class StreamingGraphEdge:
    """A cross-partition stream: each time node `src` (in the producer partition) runs for
    a request that uses `dst`'s partition, its outputs named in `tensors` (src output name
    -> dst input name; equal row counts: one row per unit) are appended to the request's
    stream and cut by `policy` into windows for node `dst` (in the consumer partition).
    Outputs of an invocation fed by a window are cut to the window's emit range (rows scale
    with the output/input length ratio). The buffer is bounded per request (backpressure
    pauses only that request's producer); end of stream reaches the consumer as the boolean
    environment value `end_flag`.

    `rows_per_unit` names consumer outputs with a fixed number of rows per unit that may
    fall short at a window's end (Code2Wav: 1920 samples a frame, its causal transposed
    convolutions drop the last 555 of a window); without it the rows per unit are the
    output's rows over the window's units, which must divide evenly."""

    src: str
    dst: str
    tensors: Mapping[str, str]
    policy: ChunkPolicy
    end_flag: str = "stream_ended"
    rows_per_unit: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Partition:
    """A set of nodes that runs concurrently with the model's other partitions."""

    name: str
    nodes: tuple[str, ...]


def walk_nodes(item: WalkItem | Walk) -> list[GraphNode]:
    """Every GraphNode of a walk item, in program order (of a walk: its join node last)."""
    if isinstance(item, Walk):
        return walk_nodes(item.body) + ([item.join.node] if item.join is not None else [])
    if isinstance(item, GraphNode):
        return [item]
    if isinstance(item, Sequential):
        return [n for it in item.items for n in walk_nodes(it)]
    if isinstance(item, Parallel):
        return list(item.branches)
    if isinstance(item, Loop):
        return walk_nodes(item.body)
    raise TypeError(f"not a walk item: {item!r}")
