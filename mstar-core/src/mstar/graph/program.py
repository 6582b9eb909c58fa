"""A walk compiled to a flat instruction list.

Walks are declarations (`mstar.graph.primitives`); a worker never interprets their nesting
recursively. `compile_walk` flattens a walk once into three kinds of instruction, so a
request's position in a walk is just a program counter plus the iterations of the loops it
stands in (`mstar.graph.cursor.WalkCursor`), and requests at different positions of
different walks can be batched by the node they wait on:

- `Stage(nodes)`: node invocations that may run together (a lone `GraphNode` is a stage of
  one; a `Parallel` is one stage of its branches);
- `LoopBegin(loop_id, loop, end_pc)`: enter `loop`; `end_pc` is the pc of its `LoopEnd`;
- `LoopEnd(loop_id, begin_pc)`: close an iteration; `begin_pc` is the pc of its `LoopBegin`.

`Sequential` concatenates its items. A walk's `Join` node is not an instruction (the worker
runs it once every child's lane has finished); it comes last in `nodes`, so a remote call
names it by its index like any other. Declaration errors (a loop that cannot end, a
non-node branch, two branches of one stage with the same name) are raised here, when the
model's walks are compiled, rather than in the middle of serving a request.
"""

from __future__ import annotations

from dataclasses import dataclass

from mstar.graph.primitives import GraphNode, Join, Loop, Parallel, Sequential, Walk, WalkItem


@dataclass(frozen=True)
class Stage:
    """Node invocations that wait on the same stage of a walk (may run in one step)."""

    nodes: tuple[GraphNode, ...]


@dataclass(frozen=True)
class LoopBegin:
    loop_id: int
    loop: Loop
    end_pc: int


@dataclass(frozen=True)
class LoopEnd:
    loop_id: int
    begin_pc: int


Instruction = Stage | LoopBegin | LoopEnd


@dataclass(frozen=True)
class WalkProgram:
    """A compiled walk: the walk itself, its instructions, and every node in program order
    (a node that appears twice in the walk appears twice here)."""

    walk: Walk
    instructions: tuple[Instruction, ...]
    nodes: tuple[GraphNode, ...]


def compile_walk(walk: Walk) -> WalkProgram:
    """Flatten `walk` into a `WalkProgram`, validating its declarations."""
    instructions: list[Instruction] = []
    nodes: list[GraphNode] = []
    _emit(walk.body, instructions, nodes, loop_ids=[0])
    if walk.join is not None:
        _check_join(walk.join)
        nodes.append(walk.join.node)
    return WalkProgram(walk=walk, instructions=tuple(instructions), nodes=tuple(nodes))


def _emit(
    item: WalkItem,
    out: list[Instruction],
    nodes: list[GraphNode],
    loop_ids: list[int],
) -> None:
    if isinstance(item, GraphNode):
        out.append(Stage((item,)))
        nodes.append(item)
    elif isinstance(item, Parallel):
        out.append(_parallel_stage(item))
        nodes.extend(item.branches)
    elif isinstance(item, Sequential):
        for sub in item.items:
            _emit(sub, out, nodes, loop_ids)
    elif isinstance(item, Loop):
        _check_loop(item)
        loop_id = loop_ids[0]
        loop_ids[0] += 1
        begin_pc = len(out)
        out.append(LoopBegin(loop_id, item, end_pc=-1))  # end_pc patched below
        first_node = len(nodes)
        _emit(item.body, out, nodes, loop_ids)
        if len(nodes) == first_node:
            raise ValueError(f"loop {loop_id} has no node in its body: {item!r}")
        out[begin_pc] = LoopBegin(loop_id, item, end_pc=len(out))
        out.append(LoopEnd(loop_id, begin_pc))
    else:
        raise TypeError(f"not a walk item: {item!r}")


def _parallel_stage(par: Parallel) -> Stage:
    if not par.branches:
        raise ValueError("Parallel needs at least one branch")
    seen: set[str] = set()
    for branch in par.branches:
        if not isinstance(branch, GraphNode):
            raise TypeError(
                f"Parallel branches must be GraphNodes, got {type(branch).__name__}: {branch!r}"
            )
        if branch.name in seen:
            raise ValueError(f"duplicate node name {branch.name!r} in one Parallel stage")
        seen.add(branch.name)
    return Stage(tuple(par.branches))


def _check_loop(loop: Loop) -> None:
    if loop.times is None and loop.until is None:
        raise ValueError(f"a Loop needs `times` or `until` (or both): {loop!r}")
    times = loop.times
    if times is not None and not isinstance(times, str):
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ValueError(f"Loop times must be a non-negative int or a name, got {times!r}")
    if loop.until is not None and not (isinstance(loop.until, str) or callable(loop.until)):
        raise TypeError(f"Loop until must be a name or a callable, got {loop.until!r}")


def _check_join(join: Join) -> None:
    if not isinstance(join.node, GraphNode):
        raise TypeError(f"a Join's node must be a GraphNode, got {join.node!r}")
    if join.times is None and join.until is None:
        raise ValueError(f"a Join needs `times` or `until` (or both): {join!r}")
    times = join.times
    if times is not None and not isinstance(times, str):
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"Join times must be a positive int or a name, got {times!r}")
