"""`Join` declarations and the noise keys of nested loops and join rounds (the runtime's
rounds are tested end to end in tests/e2e/test_join_plan.py)."""

from __future__ import annotations

import pytest
import torch

from mstar.engine import rng
from mstar.engine.work import KeyedStepContext, NodeWork
from mstar.graph import GraphNode, Join, Loop, Sequential, Walk, walk_nodes
from mstar.graph.program import compile_walk
from mstar.model.sampling import SamplingParams

ROLL = GraphNode("roll", inputs=("x",), outputs=("x",))
REFIT = GraphNode("refit", inputs=("x",), outputs=("mean",))


def test_a_join_node_comes_last_and_is_no_instruction():
    walk = Walk(Sequential(GraphNode("sample"), Loop(ROLL, times=2)),
                join=Join(REFIT, stack=("x",), feed=["mean"], times="rounds"))
    program = compile_walk(walk)
    assert [n.name for n in program.nodes] == ["sample", "roll", "refit"]
    assert [n.name for n in walk_nodes(walk)] == ["sample", "roll", "refit"]
    assert all(REFIT not in getattr(ins, "nodes", ()) for ins in program.instructions)
    assert walk.join.feed_map() == {"mean": "mean"}


@pytest.mark.parametrize("join, error", [
    (Join(REFIT), "times` or `until"),
    (Join(REFIT, times=0), "positive int"),
    (Join(REFIT, times=True), "positive int"),
])
def test_bad_joins_fail_when_the_walks_compile(join, error):
    with pytest.raises(ValueError, match=error):
        compile_walk(Walk(ROLL, join=join))


def _noise(*, iteration: int | None, outer: tuple[int, ...] = (),
           join_round: int | None = None) -> torch.Tensor:
    work = NodeWork("r", 3, ROLL, {}, seed=7, sampling=SamplingParams(), iteration=iteration,
                    outer=outer, join_round=join_round)
    return KeyedStepContext([work]).randn(0, (4,), "noise")


def test_noise_is_keyed_by_every_enclosing_loop_and_the_join_round():
    single = _noise(iteration=2)  # one loop: the key stays (site, iteration)
    assert torch.equal(single, rng.randn((4,), seed=7, child=3, site="noise", step=2))
    draws = [single, _noise(iteration=2, outer=(0,)), _noise(iteration=2, outer=(1,)),
             _noise(iteration=2, join_round=0), _noise(iteration=2, join_round=1),
             _noise(iteration=2, outer=(1,), join_round=1)]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws)
    assert torch.equal(_noise(iteration=2, outer=(1,), join_round=1), rng.randn(
        (4,), seed=7, child=3, site=rng.noise_site("noise", (1,), 1), step=2))
