"""Where one request stands in one walk: a cursor over a compiled `WalkProgram`.

The cursor never blocks and never runs anything. A worker holds one cursor per live request
(and walk), asks each for `pending()` node invocations, batches the invocations of the same
node across requests into one engine step (whatever walk or iteration each request is in),
and reports each result with `complete()`. The request's environment `env` (name -> tensor
or small host value) is shared by reference: nodes read their inputs from it (`inputs`) and
the cursor writes their outputs into it.

Semantics:

- On construction, and after each completed stage, the cursor advances until it stands on a
  `Stage` with at least one non-skipped node, or at the end of the program (`done`).
- `LoopBegin`: the iteration starts at 0. `times` is an int or the name of an int env
  value; a negative or non-int `times` raises ValueError naming it. `times` of 0 skips the
  loop entirely (its body never runs, `env[loop.iteration]` is not written); otherwise
  `env[loop.iteration] = 0`.
- `Stage`: a node whose `skip` rule returns True for `(env, iteration)` is skipped for this
  visit; skip rules are evaluated when the cursor lands on the stage, all against the same
  env. A skipped node's outputs (after `rename`) are removed from env, so a later node
  sees them absent rather than a previous iteration's values. A node's `prepare` rule runs
  once per visit, with `(env, iteration)`, the first time `inputs()` is asked for the
  reported node (as late as possible, so it sees the freshest env: a stream-fed node's
  window is put into env after `pending()` reports it); its dict is local to that invocation:
  `inputs(name)` reads it over env, and env itself never holds it (two branches of one
  `Parallel` may prepare different values under one name).
- `complete(name, outputs)`: writes `outputs` into env, each output name renamed through
  `node.rename`. Only a node that `pending()` has reported for this visit, and that is not
  yet completed, may be completed (anything else raises ValueError). When every non-skipped
  node of the stage has completed, the cursor advances.
- `LoopEnd`: the carry map is applied (`env[input] = env[output]` for each
  `loop.carry_map()` item whose output exists in env), the iteration is incremented, and the
  loop stops if `until` holds (a name: `bool(env[name])`, False when absent; a callable:
  `until(env)`) or the iteration reached `times`. Otherwise the cursor jumps back to the
  first instruction of the body and sets `env[loop.iteration]` to the new iteration.
  Nested loops keep a stack of iterations; when an inner loop ends, the enclosing loops'
  iteration values are rewritten to env (they may share the default name `iteration`).

`iteration` in skip/prepare rules and in `Invocation` is the innermost loop's iteration
(None outside loops); `Invocation.loop_path` holds every enclosing loop's iteration,
outermost first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from mstar.graph.primitives import GraphNode, Loop
from mstar.graph.program import LoopBegin, LoopEnd, Stage, WalkProgram


@dataclass(frozen=True)
class Invocation:
    """One node invocation a request waits on."""

    node: GraphNode
    iteration: int | None
    loop_path: tuple[int, ...]


@dataclass
class _Frame:
    """An active loop: its begin instruction, current iteration and resolved `times`."""

    begin: LoopBegin
    iteration: int
    times: int | None


class WalkCursor:
    """A request's position in one compiled walk (see the module docstring)."""

    def __init__(self, program: WalkProgram, env: dict[str, Any]):
        self.program = program
        self.env = env
        self._pc = 0
        self._frames: list[_Frame] = []
        # The current stage visit: its non-skipped nodes in stage order, and progress.
        self._active: tuple[GraphNode, ...] = ()
        self._reported: set[str] = set()
        self._completed: set[str] = set()
        #: Each reported node's `prepare` results for this visit (never merged into env).
        self._local: dict[str, dict[str, Any]] = {}
        self._advance()

    @property
    def done(self) -> bool:
        return self._pc >= len(self.program.instructions)

    @property
    def position(self) -> tuple[int, tuple[int, ...]]:
        """(pc, iterations of the enclosing loops, outermost first)."""
        return self._pc, self._loop_path()

    def pending(self) -> list[Invocation]:
        """The current stage's invocations not yet completed nor skipped ([] when done)."""
        if self.done:
            return []
        iteration = self._iteration()
        path = self._loop_path()
        result = []
        for node in self._active:
            if node.name in self._completed:
                continue
            self._reported.add(node.name)
            result.append(Invocation(node, iteration, path))
        return result

    def inputs(self, node_name: str) -> dict[str, Any]:
        """The values a reported node's invocation reads: each of its `inputs` from its own
        `prepare` results, else from env; a name in neither is absent (not supplied)."""
        node = next((n for n in self._active if n.name == node_name), None)
        if node is None or node_name not in self._reported:
            raise ValueError(f"node {node_name!r} has not been reported at position "
                             f"{self.position}")
        if node.prepare is not None and node_name not in self._local:
            self._local[node_name] = node.prepare(self.env, self._iteration())
        local = self._local.get(node_name, {})
        return {k: local[k] if k in local else self.env[k] for k in node.inputs
                if k in local or k in self.env}

    def outstanding(self) -> int:
        """How many of the current stage's invocations are not completed yet (cheaper than
        `pending` when only the count matters)."""
        return 0 if self.done else len(self._active) - len(self._completed)

    def complete(self, node_name: str, outputs: Mapping[str, Any]) -> None:
        """Record `node_name`'s outputs; advance when the stage is complete."""
        node = next((n for n in self._active if n.name == node_name), None)
        if (
            self.done
            or node is None
            or node_name not in self._reported
            or node_name in self._completed
        ):
            raise ValueError(
                f"node {node_name!r} is not pending at position {self.position} "
                f"(pending: {[n.name for n in self._active if n.name not in self._completed]}, "
                f"reported: {sorted(self._reported)})"
            )
        for name, value in outputs.items():
            self.env[node.rename.get(name, name)] = value
        self._completed.add(node_name)
        if len(self._completed) == len(self._active):
            self._pc += 1
            self._advance()

    def _iteration(self) -> int | None:
        return self._frames[-1].iteration if self._frames else None

    def _loop_path(self) -> tuple[int, ...]:
        return tuple(f.iteration for f in self._frames)

    def _advance(self) -> None:
        """Move to the next stage with a non-skipped node, or to the end."""
        self._active = ()
        self._reported = set()
        self._completed = set()
        self._local = {}
        instructions = self.program.instructions
        while self._pc < len(instructions):
            ins = instructions[self._pc]
            if isinstance(ins, Stage):
                iteration = self._iteration()
                skipped = {n.name for n in ins.nodes
                           if n.skip is not None and n.skip(self.env, iteration)}
                active = tuple(n for n in ins.nodes if n.name not in skipped)
                for node in ins.nodes:  # after every rule ran: they all see the same env
                    if node.name in skipped:
                        for name in node.outputs:
                            self.env.pop(node.rename.get(name, name), None)
                if active:
                    self._active = active
                    return
                self._pc += 1
            elif isinstance(ins, LoopBegin):
                times = self._resolve_times(ins.loop)
                if times == 0:
                    self._pc = ins.end_pc + 1
                    continue
                self._frames.append(_Frame(ins, 0, times))
                self.env[ins.loop.iteration] = 0
                self._pc += 1
            elif isinstance(ins, LoopEnd):
                self._end_iteration(ins)
            else:  # pragma: no cover - compile_walk emits only the three kinds
                raise TypeError(f"unknown instruction {ins!r}")

    def _end_iteration(self, ins: LoopEnd) -> None:
        frame = self._frames[-1]
        loop = frame.begin.loop
        for out_name, in_name in loop.carry_map().items():
            if out_name in self.env:
                self.env[in_name] = self.env[out_name]
        frame.iteration += 1
        if self._until_holds(loop) or frame.iteration == frame.times:
            self._frames.pop()
            for outer in self._frames:
                self.env[outer.begin.loop.iteration] = outer.iteration
            self._pc += 1
        else:
            self.env[loop.iteration] = frame.iteration
            self._pc = ins.begin_pc + 1

    def _until_holds(self, loop: Loop) -> bool:
        if loop.until is None:
            return False
        if isinstance(loop.until, str):
            return bool(self.env.get(loop.until, False))
        return bool(loop.until(self.env))

    def _resolve_times(self, loop: Loop) -> int | None:
        times = loop.times
        source = "times"
        if isinstance(times, str):
            source = f"times (env value {times!r})"
            if times not in self.env:
                raise ValueError(f"Loop {source} is missing from the request environment")
            times = self.env[times]
        if times is None:
            return None
        if isinstance(times, bool) or not isinstance(times, Integral) or times < 0:
            raise ValueError(f"Loop {source} must be a non-negative int, got {times!r}")
        return int(times)
