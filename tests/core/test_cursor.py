"""Walk compilation and the per-request walk cursor, driven the way a worker drives them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

from mstar.graph.cursor import Invocation, WalkCursor
from mstar.graph.primitives import GraphNode, Loop, Parallel, Sequential, Walk
from mstar.graph.program import LoopBegin, LoopEnd, Stage, compile_walk

Runner = Callable[[Invocation, dict[str, Any]], Mapping[str, Any]]


def drive(cursor: WalkCursor, run: Runner) -> list[tuple[str, int | None, tuple[int, ...]]]:
    """Run a cursor to the end, reading each invocation's inputs as the worker does; returns
    the trace of (node, iteration, loop_path)."""
    trace = []
    for _ in range(10_000):
        if cursor.done:
            return trace
        invocations = cursor.pending()
        assert invocations, "a cursor that is not done always has pending work"
        for inv in invocations:
            trace.append((inv.node.name, inv.iteration, inv.loop_path))
            cursor.inputs(inv.node.name)
            cursor.complete(inv.node.name, run(inv, cursor.env))
    raise AssertionError("walk did not finish")


def no_outputs(inv: Invocation, env: dict[str, Any]) -> Mapping[str, Any]:
    return {}


def cursor_for(body, env: dict[str, Any] | None = None) -> WalkCursor:
    return WalkCursor(compile_walk(Walk(body)), {} if env is None else env)


# ---------------------------------------------------------------- compilation


def test_compile_flattens_nested_walk():
    a, b, c, d = (GraphNode(n) for n in "abcd")
    loop = Loop(Sequential(b, Parallel(c, d)), times=2)
    program = compile_walk(Walk(Sequential(a, loop, a)))
    assert program.instructions == (
        Stage((a,)),
        LoopBegin(0, loop, end_pc=4),
        Stage((b,)),
        Stage((c, d)),
        LoopEnd(0, begin_pc=1),
        Stage((a,)),
    )
    assert [n.name for n in program.nodes] == ["a", "b", "c", "d", "a"]


def test_compile_errors():
    with pytest.raises(TypeError, match="Parallel branches must be GraphNodes"):
        compile_walk(Walk(Parallel(GraphNode("a"), Sequential(GraphNode("b")))))
    with pytest.raises(ValueError, match="needs `times` or `until`"):
        compile_walk(Walk(Loop(GraphNode("a"))))
    with pytest.raises(ValueError, match="duplicate node name 'a'"):
        compile_walk(Walk(Parallel(GraphNode("a"), GraphNode("a", label="other"))))
    with pytest.raises(ValueError, match="non-negative int"):
        compile_walk(Walk(Loop(GraphNode("a"), times=-1)))
    with pytest.raises(ValueError, match="no node in its body"):
        compile_walk(Walk(Loop(Sequential(), until="done")))
    with pytest.raises(TypeError, match="not a walk item"):
        compile_walk(Walk(Sequential(GraphNode("a"), "b")))


# ---------------------------------------------------------------- stages


def test_sequential_runs_in_order_and_feeds_outputs_forward():
    enc = GraphNode("enc", inputs=("x",), outputs=("h",))
    dec = GraphNode("dec", inputs=("h",), outputs=("y",))

    def run(inv, env):
        if inv.node.name == "enc":
            return {"h": env["x"] * 2}
        return {"y": env["h"] + 1}

    cursor = cursor_for(Sequential(enc, dec), {"x": torch.tensor([1.0, 2.0])})
    assert cursor.position == (0, ())
    trace = drive(cursor, run)
    assert trace == [("enc", None, ()), ("dec", None, ())]
    assert cursor.done and cursor.pending() == []
    assert torch.equal(cursor.env["y"], torch.tensor([3.0, 5.0]))
    assert cursor.position == (2, ())


def test_parallel_stage_waits_for_every_branch_and_renames():
    cond = GraphNode("LLM", outputs=("velocity",))
    uncond = GraphNode(
        "LLM_uncond",
        alias_of="LLM",
        label="uncond",
        outputs=("velocity",),
        rename={"velocity": "velocity_uncond"},
    )
    combine = GraphNode("combine", inputs=("velocity", "velocity_uncond"))
    cursor = cursor_for(Sequential(Parallel(cond, uncond), combine))
    assert [inv.node.name for inv in cursor.pending()] == ["LLM", "LLM_uncond"]
    cursor.complete("LLM_uncond", {"velocity": 2.0})
    assert [inv.node.name for inv in cursor.pending()] == ["LLM"]
    assert cursor.position == (0, ())
    cursor.complete("LLM", {"velocity": 1.0})
    assert [inv.node.name for inv in cursor.pending()] == ["combine"]
    assert cursor.env["velocity"] == 1.0 and cursor.env["velocity_uncond"] == 2.0
    assert uncond.module == "LLM"


def test_skip_rule_by_env_and_iteration():
    """CFG branch: skipped at scale 1, and outside the CFG interval of iterations."""

    def skip_cfg(env, iteration):
        lo, hi = env["cfg_interval"]
        return env["cfg_scale"] == 1.0 or not (lo <= iteration < hi)

    body = Parallel(GraphNode("LLM"), GraphNode("LLM_cfg", alias_of="LLM", skip=skip_cfg))
    walk = Loop(body, times="steps")

    cursor = cursor_for(walk, {"steps": 5, "cfg_scale": 4.0, "cfg_interval": (1, 3)})
    runs = [(name, it) for name, it, _ in drive(cursor, no_outputs)]
    assert runs == [
        ("LLM", 0),
        ("LLM", 1),
        ("LLM_cfg", 1),
        ("LLM", 2),
        ("LLM_cfg", 2),
        ("LLM", 3),
        ("LLM", 4),
    ]

    cursor = cursor_for(walk, {"steps": 5, "cfg_scale": 1.0, "cfg_interval": (0, 5)})
    assert [name for name, _, _ in drive(cursor, no_outputs)] == ["LLM"] * 5


def test_fully_skipped_stage_is_passed_over():
    skip_all = GraphNode("opt", skip=lambda env, it: True)
    cursor = cursor_for(Sequential(GraphNode("a"), Parallel(skip_all), GraphNode("b")))
    assert drive(cursor, no_outputs) == [("a", None, ()), ("b", None, ())]
    only_skipped = cursor_for(Sequential(skip_all))
    assert only_skipped.done and only_skipped.pending() == []


def test_prepare_called_once_per_visit_with_iteration():
    calls: list[int | None] = []

    def prepare(env, iteration):
        calls.append(iteration)
        return {"timestep": 1.0 - iteration / 4}

    denoise = GraphNode("denoise", inputs=("timestep",), prepare=prepare)
    cursor = cursor_for(Loop(denoise, times=4))
    assert calls == []  # prepared only when reported
    seen = []
    while not cursor.done:
        first = cursor.pending()
        again = cursor.pending()  # asking twice must not prepare twice
        assert first == again
        seen.append(cursor.inputs("denoise")["timestep"])
        cursor.complete("denoise", {})
    assert calls == [0, 1, 2, 3]
    assert seen == [1.0, 0.75, 0.5, 0.25]

    outside: list[int | None] = []
    node = GraphNode("p", prepare=lambda env, it: outside.append(it) or {})
    drive(cursor_for(node), no_outputs)
    assert outside == [None]


def test_prepare_sees_what_was_put_into_env_after_the_node_was_reported():
    """A stream-fed node's window enters env once the node is reported and the window is
    ready: its prepare rule (a Talker's prompt rows) must see this window, not the last."""
    node = GraphNode("talker", inputs=("n",),
                     prepare=lambda env, it: {"n": env["window"].shape[0]})
    env: dict[str, Any] = {}
    cursor = cursor_for(Loop(node, times=2), env)
    for rows in (5, 1):
        assert [inv.node.name for inv in cursor.pending()] == ["talker"]
        env["window"] = torch.zeros(rows, 2)
        assert cursor.inputs("talker") == {"n": rows}
        cursor.complete("talker", {})
    assert cursor.done


def test_prepare_results_are_local_to_their_invocation():
    """Two branches of one Parallel prepare different `positions` (each CFG context has its
    own length): each reads its own, and neither the env nor a later stage sees them."""
    branch = dict(inputs=("positions", "x"), outputs=("velocity",))
    cond = GraphNode("LLM", prepare=lambda env, it: {"positions": env["cond_len"]}, **branch)
    uncond = GraphNode("LLM_uncond", alias_of="LLM", label="uncond",
                       rename={"velocity": "velocity_uncond"},
                       prepare=lambda env, it: {"positions": env["uncond_len"]}, **branch)
    later = GraphNode("combine", inputs=("positions", "x", "velocity", "velocity_uncond"))
    env = {"cond_len": 9, "uncond_len": 4, "x": 1.0}
    cursor = cursor_for(Sequential(Parallel(cond, uncond), later), env)
    seen = {}
    for inv in cursor.pending():  # both reported (prepared) before either runs
        seen[inv.node.name] = cursor.inputs(inv.node.name)
    assert seen == {"LLM": {"positions": 9, "x": 1.0},
                    "LLM_uncond": {"positions": 4, "x": 1.0}}
    cursor.complete("LLM", {"velocity": 1.0})
    cursor.complete("LLM_uncond", {"velocity": 2.0})
    assert "positions" not in env
    assert [inv.node.name for inv in cursor.pending()] == ["combine"]
    assert cursor.inputs("combine") == {"x": 1.0, "velocity": 1.0, "velocity_uncond": 2.0}
    with pytest.raises(ValueError, match="'LLM' has not been reported"):
        cursor.inputs("LLM")


def test_skipped_branch_leaves_no_stale_outputs():
    """A CFG branch that ran on iteration 1 and is skipped on iteration 2 leaves no
    `velocity_uncond` for combine on iteration 2."""
    uncond = GraphNode("LLM_uncond", alias_of="LLM", label="uncond", outputs=("velocity",),
                       rename={"velocity": "velocity_uncond"},
                       skip=lambda env, it: it != 1)
    combine = GraphNode("combine", inputs=("velocity", "velocity_uncond"))
    cursor = cursor_for(Loop(Sequential(Parallel(GraphNode("LLM", outputs=("velocity",)),
                                                 uncond), combine), times=3))
    combined = []

    def run(inv, env):
        if inv.node.name == "combine":
            combined.append((inv.iteration, cursor.inputs("combine")))
            return {}
        return {"velocity": (inv.node.name, inv.iteration)}

    drive(cursor, run)
    assert combined == [
        (0, {"velocity": ("LLM", 0)}),
        (1, {"velocity": ("LLM", 1), "velocity_uncond": ("LLM_uncond", 1)}),
        (2, {"velocity": ("LLM", 2)}),
    ]


# ---------------------------------------------------------------- loops


def test_loop_times_int_env_and_zero():
    step = GraphNode("step")
    assert [it for _, it, _ in drive(cursor_for(Loop(step, times=3)), no_outputs)] == [0, 1, 2]

    env = {"n": 2}
    cursor = cursor_for(Loop(step, times="n", iteration="t"), env)
    assert env["t"] == 0
    assert [it for _, it, _ in drive(cursor, no_outputs)] == [0, 1]
    assert env["t"] == 1

    env = {"n": 0}
    cursor = cursor_for(Sequential(Loop(step, times="n", iteration="t"), GraphNode("after")), env)
    assert drive(cursor, no_outputs) == [("after", None, ())]
    assert "t" not in env
    assert cursor_for(Loop(step, times=0)).done


def test_loop_until_boolean_env_decode_style():
    """Decode: `token_ids` carries into `input_ids`; stops when `finished` becomes True."""
    prompt_last = 7
    decode = GraphNode("LLM", inputs=("input_ids",), outputs=("token_ids", "finished"))
    env: dict[str, Any] = {"input_ids": torch.tensor([prompt_last])}
    cursor = cursor_for(Loop(decode, until="finished", carry={"token_ids": "input_ids"}), env)
    fed = []

    def run(inv, env):
        fed.append(int(env["input_ids"]))
        token = int(env["input_ids"]) + 1
        return {"token_ids": torch.tensor([token]), "finished": token == 11}

    trace = drive(cursor, run)
    assert fed == [7, 8, 9, 10]
    assert [it for _, it, _ in trace] == [0, 1, 2, 3]
    assert env["finished"] is True and int(env["input_ids"]) == 11


def test_loop_until_absent_flag_runs_to_times():
    cursor = cursor_for(Loop(GraphNode("step"), times=3, until="stop"))
    assert len(drive(cursor, no_outputs)) == 3


def test_loop_until_callable_and_times_whichever_first():
    node = GraphNode("acc", outputs=("total",))

    def run(inv, env):
        return {"total": env.get("total", 0) + 5}

    cursor = cursor_for(Loop(node, times=10, until=lambda env: env["total"] >= 12))
    assert len(drive(cursor, run)) == 3
    assert cursor.env["total"] == 15

    cursor = cursor_for(Loop(node, times=2, until=lambda env: env["total"] >= 12))
    assert len(drive(cursor, run)) == 2


def test_carry_list_feeds_same_named_input():
    node = GraphNode("flow", inputs=("latents",), outputs=("latents_next",))
    env = {"latents": torch.zeros(2)}

    def run(inv, env):
        return {"latents_next": env["latents"] + 1}

    same_name = GraphNode("flow2", inputs=("x",), outputs=("x",))
    cursor = cursor_for(Loop(node, times=3, carry={"latents_next": "latents"}), env)
    drive(cursor, run)
    assert torch.equal(env["latents"], torch.full((2,), 3.0))

    env2 = {"x": 1}
    drive(cursor_for(Loop(same_name, times=4, carry=["x"]), env2), lambda i, e: {"x": e["x"] * 2})
    assert env2["x"] == 16


def test_nested_loops_loop_path_and_iteration_restore():
    inner_node = GraphNode("inner", prepare=lambda env, it: {"seen_outer": env["outer"]})
    outer_node = GraphNode("outer_node")
    walk = Loop(
        Sequential(Loop(inner_node, times="k"), outer_node),
        times=2,
        iteration="outer",
    )
    env = {"k": 2}
    cursor = cursor_for(walk, env)
    trace = []
    while not cursor.done:
        for inv in cursor.pending():
            trace.append(
                (
                    inv.node.name,
                    inv.iteration,
                    inv.loop_path,
                    env["iteration"] if inv.node.name == "inner" else None,
                    env["outer"],
                )
            )
            cursor.complete(inv.node.name, {})
    assert trace == [
        ("inner", 0, (0, 0), 0, 0),
        ("inner", 1, (0, 1), 1, 0),
        ("outer_node", 0, (0,), None, 0),
        ("inner", 0, (1, 0), 0, 1),
        ("inner", 1, (1, 1), 1, 1),
        ("outer_node", 1, (1,), None, 1),
    ]

    # Two loops sharing the default iteration name: the outer value comes back after the
    # inner loop ends.
    shared = Loop(Sequential(Loop(GraphNode("i"), times=3), GraphNode("o")), times=2)
    cursor = cursor_for(shared)
    seen = []
    while not cursor.done:
        for inv in cursor.pending():
            seen.append((inv.node.name, cursor.env["iteration"], inv.iteration))
            cursor.complete(inv.node.name, {})
    assert [s for s in seen if s[0] == "o"] == [("o", 0, 0), ("o", 1, 1)]
    assert all(env_it == it for _, env_it, it in seen)


def test_position_tracks_pc_and_iterations():
    cursor = cursor_for(Sequential(GraphNode("a"), Loop(GraphNode("b"), times=2)))
    positions = []
    while not cursor.done:
        positions.append(cursor.position)
        (inv,) = cursor.pending()
        cursor.complete(inv.node.name, {})
    assert positions == [(0, ()), (2, (0,)), (2, (1,))]
    assert cursor.position == (4, ())


# ---------------------------------------------------------------- errors


def test_bad_times_at_runtime():
    for bad in (-1, 2.5, True, "three"):
        with pytest.raises(ValueError, match="times .env value 'n'."):
            cursor_for(Loop(GraphNode("a"), times="n"), {"n": bad})
    with pytest.raises(ValueError, match="missing"):
        cursor_for(Loop(GraphNode("a"), times="n"), {})


def test_completing_a_node_that_is_not_pending():
    cursor = cursor_for(Sequential(Parallel(GraphNode("a"), GraphNode("b")), GraphNode("c")))
    with pytest.raises(ValueError, match="'a' is not pending"):
        cursor.complete("a", {})  # not reported by pending() yet
    cursor.pending()
    with pytest.raises(ValueError, match="'c' is not pending"):
        cursor.complete("c", {})
    cursor.complete("a", {})
    with pytest.raises(ValueError, match="'a' is not pending"):
        cursor.complete("a", {})
    cursor.complete("b", {})
    skipped = cursor_for(Parallel(GraphNode("a"), GraphNode("s", skip=lambda e, i: True)))
    skipped.pending()
    with pytest.raises(ValueError, match="'s' is not pending"):
        skipped.complete("s", {})
    skipped.complete("a", {})
    assert skipped.done
    with pytest.raises(ValueError, match="not pending"):
        skipped.complete("a", {})


# ---------------------------------------------------------------- many requests


def test_interleaved_cursors_are_independent():
    """A worker batches invocations of the same node across requests in different walks
    and iterations; each request's cursor and env evolve on their own."""
    llm = GraphNode("LLM", inputs=("input_ids",), outputs=("token_ids", "finished"))
    prefill = Walk(Sequential(GraphNode("embed", outputs=("input_ids",)), llm))
    decode = Walk(Loop(llm, until="finished", carry={"token_ids": "input_ids"}))
    denoise = Walk(Loop(Sequential(llm, GraphNode("vae")), times="steps"))
    programs = [compile_walk(w) for w in (prefill, decode, denoise)]

    def run(name: str, env: dict[str, Any]) -> dict[str, Any]:
        if name == "embed":
            return {"input_ids": env["start"]}
        if name == "LLM":
            token = env.get("input_ids", 0) + env["inc"]
            return {"token_ids": token, "finished": token >= env["stop"]}
        return {"decoded": env.get("decoded", 0) + 1}

    envs = [
        {"start": 3, "inc": 1, "stop": 100},
        {"input_ids": 10, "inc": 2, "stop": 15},
        {"input_ids": 0, "inc": 1, "stop": 10**6, "steps": 3},
        {"input_ids": 50, "inc": 5, "stop": 60},
    ]
    cursors = [WalkCursor(programs[p], env) for p, env in zip([0, 1, 2, 1], envs)]
    llm_batches = []
    for _ in range(100):
        live = [c for c in cursors if not c.done]
        if not live:
            break
        # One "engine step" per node: batch all requests waiting on it.
        by_node: dict[str, list[tuple[WalkCursor, Invocation]]] = {}
        for c in live:
            for inv in c.pending():
                by_node.setdefault(inv.node.name, []).append((c, inv))
        for name, batch in sorted(by_node.items()):
            if name == "LLM":
                llm_batches.append(sorted((cursors.index(c), inv.iteration) for c, inv in batch))
            for c, _ in batch:
                c.complete(name, run(name, c.env))
    assert all(c.done for c in cursors)
    assert envs[0]["token_ids"] == 4
    assert envs[1]["token_ids"] == 16 and envs[1]["iteration"] == 2
    assert envs[2]["decoded"] == 3
    assert envs[3]["token_ids"] == 60 and envs[3]["iteration"] == 1
    # The first LLM step batches a prefill-less decode, a denoise step and another decode.
    assert llm_batches[0] == [(1, 0), (2, 0), (3, 0)]
    assert llm_batches[1] == [(0, None), (1, 1), (3, 1)]
