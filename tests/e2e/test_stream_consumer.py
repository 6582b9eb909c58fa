"""A consumer fed by a stream the way Qwen3-Omni's Talker is (issue 15), in one process on
two ranks: its first window's size comes from the request (`first_chunk_param`), larger
than the edge's `max_buffered`, without a deadlock; it goes on after the stream ended with
empty windows (`continue_after_end`) until its own loop ends; and `ctx.sample` draws with
the site's own sampling parameters and sees the ids drawn there before (penalties).

The model is built here from stateless nodes: `source` (rank 0) pushes `prompt_rows` rows
at its first iteration (a Thinker's prompt) and one row at each later one (a generated
token), `count` iterations in all; `sink` (rank 1) runs `speak` times, reporting each window
it got, and draws one id per invocation at site "voice" from fixed logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import collect, finished, settle, tensors, wait_for
from torch import nn

from mstar import events
from mstar.config import DeploymentConfig
from mstar.graph import ChunkPolicy, GraphNode, Loop, Partition, StreamingGraphEdge, Walk
from mstar.model import Done, Model, RequestPlan, SamplingParams, WalkStep
from mstar.plugins.registry import ModelSpec
from mstar.runtime.builder import LoadOptions
from mstar.runtime.local import LocalDeployment

pytestmark = pytest.mark.timeout(120)  # a deadlock that is not detected hangs until here

#: One row per window after the first, whose size the request sets; at most two rows in
#: flight otherwise, far fewer than a prompt.
POLICY = ChunkPolicy(window=1, hop=1, emit=(0, 1), max_buffered=2,
                     first_chunk_param="first_rows", continue_after_end=True)
#: Fixed logits of the "voice" site: greedy picks id 0 unless penalties push it away.
VOICE_LOGITS = torch.tensor([[4.0, 3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5]])


class Relay(nn.Module):
    """`source`: its rows; `sink`: the window passed on, what it saw, one "voice" id."""

    def forward(self, items: list[dict[str, Any]], ctx: Any) -> list[dict[str, Any]]:
        out = []
        for i, item in enumerate(items):
            step = int(item["iteration"])
            if "rows" not in item:  # source
                first, n = (0, item["prompt_rows"]) if step == 0 else \
                    (item["prompt_rows"] + step - 1, 1)
                values = torch.arange(first, first + n, dtype=torch.float32)
                out.append({"rows": values.unsqueeze(1).repeat(1, 2)})
                continue
            rows = item["rows"]
            voice = ctx.sample(i, VOICE_LOGITS, site="voice", step=step)
            out.append({"rows": rows.clone(), "done": step + 1 >= item["speak"],
                        # rows, the end flag, the trailing width, float32?, the voice id
                        "seen": [rows.shape[0], int(item["stream_ended"]), rows.shape[1],
                                 int(rows.dtype == torch.float32), int(voice[0])]})
        return out


@dataclass(frozen=True)
class RelayConfig:
    pass


class RelayModel(Model):
    config_class = RelayConfig
    presets = {"tiny": {}}

    def node_engine_types(self):
        return {"source": "stateless", "sink": "stateless"}

    def partitions(self):
        return [Partition("src", ("source",)), Partition("dst", ("sink",))]

    def streaming_edges(self):
        return [StreamingGraphEdge("source", "sink", {"rows": "rows"}, POLICY)]

    def graph_walks(self):
        return {
            "source_walk": Walk(Loop(GraphNode("source", inputs=("iteration", "prompt_rows"),
                                               outputs=("rows",)), times="count")),
            "sink_walk": Walk(Loop(GraphNode("sink", inputs=("rows", "stream_ended",
                                                             "iteration", "speak"),
                                             outputs=("rows", "done", "seen"),
                                             emit=("rows", "seen")), until="done")),
        }

    def build_submodule(self, node, ctx):
        return Relay()

    def process_prompt(self, request):
        sampling = {"sink": SamplingParams(temperature=0)}  # the node's own: no penalty
        if "voice" in request:
            sampling["voice"] = SamplingParams(**request["voice"])
        params = {k: request[k] for k in ("count", "prompt_rows", "speak", "first_rows")
                  if k in request}
        return RequestPlan(first_walks={"src": WalkStep("source_walk"),
                                        "dst": WalkStep("sink_walk")},
                           params=params, sampling=sampling)

    def next_walk(self, state, control):
        return Done("stop")

    def postprocess(self, outputs, state):
        out = []
        if "rows" in outputs:
            out.append(events.NamedTensor("rows", events.TensorData.from_tensor(
                outputs["rows"])))
        if "seen" in outputs:  # a host value
            out.append(events.NamedTensor("seen", events.TensorData.from_tensor(
                torch.tensor(outputs["seen"]))))
        return out


@pytest.fixture(scope="module")
def dep():
    config = DeploymentConfig.model_validate({
        "model": "relay", "request_timeout": 600,  # a stall must not wait for this
        "node_groups": [{"node_names": ["source"], "ranks": [0]},
                        {"node_names": ["sink"], "ranks": [1]}]})
    d = LocalDeployment(ModelSpec("relay", f"{__name__}:RelayModel"), RelayModel(RelayConfig()),
                        config, LoadOptions(load_format="dummy"))
    yield d
    d.close()


def seen(evs: list[events.Event]) -> list[list[int]]:
    return [t.tolist() for t in tensors(evs, "seen")]


def test_a_per_request_first_window_larger_than_max_buffered_forms_without_deadlock(dep):
    # 5 prompt rows at once and 3 generated ones; the first window takes the prompt and the
    # first generated row (6 > max_buffered 2): the source must not pause before pushing it
    evs = collect(dep, {"count": 4, "prompt_rows": 5, "first_rows": 6, "speak": 3})
    assert finished(evs).reason == "stop", evs[-1]
    # (the last window's end flag depends on whether the end arrived before it was cut)
    assert [s[:2] for s in seen(evs)][:2] == [[6, 0], [1, 0]]
    assert [s[0] for s in seen(evs)] == [6, 1, 1]
    rows = torch.cat(tensors(evs, "rows"))
    assert rows[:, 0].tolist() == [float(u) for u in range(8)]  # every row once, in order
    # in flight at most: the request's own first window (then max_buffered again)
    assert dep.workers[0].stream_peak == 6
    settle(dep)


def test_the_consumer_goes_on_after_the_end_with_empty_windows(dep):
    evs = collect(dep, {"count": 2, "prompt_rows": 3, "first_rows": 4, "speak": 6})
    assert finished(evs).reason == "stop", evs[-1]
    got = seen(evs)
    assert len(got) == 6  # its own loop ended it, five invocations past the stream's end
    assert got[0][0] == 4  # the whole stream in the first window
    for n, ended, width, is_float, _ in got[1:]:
        assert (n, ended, width, is_float) == (0, 1, 2, 1)  # 0 rows, the stream's shape
    assert torch.cat(tensors(evs, "rows"))[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    settle(dep)


def test_a_stream_that_ends_short_of_the_first_window_flushes_what_it_has(dep):
    # a Thinker that stops at its prefill: the prompt's 3 rows, never the fourth
    evs = collect(dep, {"count": 1, "prompt_rows": 3, "first_rows": 4, "speak": 3})
    assert finished(evs).reason == "stop", evs[-1]
    assert [s[:2] for s in seen(evs)] == [[3, 1], [0, 1], [0, 1]]
    settle(dep)


def test_a_stream_that_ended_empty_fails_a_consumer_that_goes_on(dep):
    evs = collect(dep, {"count": 0, "prompt_rows": 3, "first_rows": 4, "speak": 2})
    error = evs[-1]
    assert isinstance(error, events.Error) and error.code == 500, error
    assert "streaming edge source->sink ended before any unit was pushed" in error.message
    settle(dep)


@pytest.mark.parametrize("first_rows", [None, 0, "4"])
def test_a_missing_or_bad_first_window_param_fails_the_request_naming_it(dep, first_rows):
    request = {"count": 2, "prompt_rows": 3, "speak": 2}
    if first_rows is not None:
        request["first_rows"] = first_rows
    error = collect(dep, request)[-1]
    assert isinstance(error, events.Error) and error.code == 500, error  # the model's param
    assert "request param 'first_rows'" in error.message and "positive int" in error.message
    settle(dep)


def test_ctx_sample_uses_the_sites_params_and_its_history(dep):
    base = {"count": 2, "prompt_rows": 1, "first_rows": 2, "speak": 4}
    # the node's own params (greedy, no penalty): the same id every time
    plain = [s[4] for s in seen(collect(dep, base))]
    assert plain == [0] * 4
    # the site's: a presence penalty over the ids drawn there before walks down the logits
    evs = collect(dep, {**base, "voice": {"temperature": 0, "presence_penalty": 2.0}})
    assert [s[4] for s in seen(evs)] == [0, 1, 2, 3]
    evs = collect(dep, {**base, "voice": {"temperature": 0, "repetition_penalty": 10.0}})
    assert [s[4] for s in seen(evs)] == [0, 1, 2, 3]
    settle(dep)
    # the history lives with the request on the worker and goes with it (its Release)
    wait_for(lambda: all(not w.requests for w in dep.workers.values()))


class WrongWalkModel(RelayModel):
    """A model bug: a plan or `next_walk` naming a walk the model does not declare."""

    def process_prompt(self, request):
        plan = super().process_prompt(request)
        if request.get("bad_start"):
            plan.first_walks["src"] = WalkStep("no_such_walk")
        plan.params["tensor_input"] = request.get("tensor_input", False)
        return plan

    def next_walk(self, state, control):
        if state.walk != "source_walk":
            return Done("stop")
        if state.params.get("tensor_input"):  # a tensor cannot travel in a control message
            return WalkStep("source_walk", inputs={"noise": torch.zeros(2)})
        return WalkStep("no_such_walk")


def test_a_walk_the_model_does_not_declare_fails_the_request_not_the_conductor():
    config = DeploymentConfig.model_validate({
        "model": "relay", "node_groups": [{"node_names": ["source", "sink"], "ranks": [0]}]})
    with LocalDeployment(ModelSpec("relay", f"{__name__}:WrongWalkModel"),
                         WrongWalkModel(RelayConfig()), config,
                         LoadOptions(load_format="dummy")) as d:
        request = {"count": 1, "prompt_rows": 2, "first_rows": 2, "speak": 1}
        for bad in ({**request, "bad_start": True}, request):
            evs = collect(d, bad)
            assert isinstance(evs[-1], events.Error) and evs[-1].code == 500, evs[-1]
            assert "'no_such_walk', which" in evs[-1].message, evs[-1].message
        evs = collect(d, {**request, "tensor_input": True})
        assert isinstance(evs[-1], events.Error) and evs[-1].code == 500, evs[-1]
        assert "input 'noise' of walk 'source_walk' is a Tensor" in evs[-1].message, evs[-1]
        settle(d)
