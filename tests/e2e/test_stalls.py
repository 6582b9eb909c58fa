"""Stalls are detected as events, not by a timer: a request whose every component holding
it is blocked, with none of its messages in flight, fails at once with a 500 naming what it
waits on, while a request held back by legitimate backpressure runs to its end.

The model is built here: two stateless nodes per pair of partitions on two ranks (so the
counts of messages between workers matter). `cycle`: `ping` (rank 0) consumes `pong`'s
stream and `pong` (rank 1) consumes `ping`'s, so neither window ever forms. `pipe`:
`source` (rank 0) pushes two units per invocation into `sink` (rank 1), which emits one
per window and is slow (`delay_s` per window, as a real codec is): the source keeps
outrunning its credits and must pause at `max_buffered`, blocked, while credits are on
their way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import collect, finished, settle, tensors
from fastapi.testclient import TestClient
from torch import nn

from mstar import events
from mstar.api_server.app import create_app
from mstar.config import DeploymentConfig
from mstar.config.settings import ServerSettings
from mstar.graph import ChunkPolicy, GraphNode, Loop, Partition, StreamingGraphEdge, Walk
from mstar.model import Done, Model, RequestPlan, WalkStep
from mstar.plugins.registry import ModelSpec
from mstar.runtime.builder import LoadOptions
from mstar.runtime.local import LocalDeployment
from mstar.serving.backends import LocalBackend

pytestmark = pytest.mark.timeout(120)  # a stall that is not detected hangs until here

POLICY = ChunkPolicy(window=2, hop=1, emit=(0, 1), max_buffered=2)  # one unit of lookahead


class Units(nn.Module):
    """`source`: two units per iteration (2i, 2i + 1); the others pass their window on
    (after `delay_s` when they get one)."""

    def forward(self, items: list[dict[str, Any]], ctx: Any) -> list[dict[str, Any]]:
        out = []
        time.sleep(max((item.get("delay_s", 0.0) for item in items), default=0.0))
        for item in items:
            if "iteration" in item:
                i = int(item["iteration"])
                out.append({"units": torch.tensor([[2.0 * i], [2.0 * i + 1]])})
            else:
                out.append({"units": item["window"].clone()})
        return out


@dataclass(frozen=True)
class StallsConfig:
    pass


class Stalls(Model):
    config_class = StallsConfig
    presets = {"tiny": {}}

    def node_engine_types(self):
        return {n: "stateless" for n in ("ping", "pong", "source", "sink")}

    def partitions(self):
        return [Partition("a", ("ping",)), Partition("b", ("pong",)),
                Partition("src", ("source",)), Partition("dst", ("sink",))]

    def streaming_edges(self):
        return [StreamingGraphEdge("ping", "pong", {"units": "window"}, POLICY),
                StreamingGraphEdge("pong", "ping", {"units": "window"}, POLICY),
                StreamingGraphEdge("source", "sink", {"units": "window"}, POLICY)]

    def graph_walks(self):
        def relay(name: str, **kw: Any) -> GraphNode:
            return GraphNode(name, inputs=("window", "delay_s"), outputs=("units",), **kw)

        return {
            "ping_walk": Walk(Loop(relay("ping"), until="stream_ended")),
            "pong_walk": Walk(Loop(relay("pong"), until="stream_ended")),
            "source_walk": Walk(Loop(GraphNode("source", inputs=("iteration",),
                                               outputs=("units",)), times="count")),
            "sink_walk": Walk(Loop(relay("sink", emit=("units",)), until="stream_ended")),
        }

    def build_submodule(self, node, ctx):
        return Units()

    def process_prompt(self, request):
        if request["mode"] == "cycle":
            first = {"a": WalkStep("ping_walk"), "b": WalkStep("pong_walk")}
        else:
            first = {"src": WalkStep("source_walk"), "dst": WalkStep("sink_walk")}
        return RequestPlan(first_walks=first, params={"count": request.get("count", 0),
                                                      "delay_s": request.get("delay_s", 0.0)})

    def next_walk(self, state, control):
        return Done("stop")

    def postprocess(self, outputs, state):
        if "units" not in outputs:
            return []
        return [events.NamedTensor("units", events.TensorData.from_tensor(outputs["units"]))]


@pytest.fixture(scope="module")
def dep():
    config = DeploymentConfig.model_validate({
        "model": "stalls", "request_timeout": 600,  # a stall must not wait for this
        "node_groups": [{"node_names": ["ping", "source"], "ranks": [0]},
                        {"node_names": ["pong", "sink"], "ranks": [1]}]})
    model = Stalls(StallsConfig())
    d = LocalDeployment(ModelSpec("stalls", f"{__name__}:Stalls"), model, config,
                        LoadOptions(load_format="dummy"))
    yield d
    d.close()


def test_a_stalled_request_fails_at_once_naming_what_it_waits_on(dep):
    evs = collect(dep, {"mode": "cycle"})
    error = evs[-1]
    assert isinstance(error, events.Error), error
    assert error.code == 500
    assert "stalled" in error.message
    assert ("walk 'ping_walk' node 'ping' waits on streaming edge pong->ping "
            "(0 units pushed, the next window needs 2)") in error.message
    assert ("walk 'pong_walk' node 'pong' waits on streaming edge ping->pong "
            "(0 units pushed, the next window needs 2)") in error.message
    settle(dep)


def test_backpressure_is_not_a_stall(dep):
    evs = collect(dep, {"mode": "pipe", "count": 30, "delay_s": 0.01})
    assert finished(evs).reason == "stop"
    units = torch.cat(tensors(evs, "units")).reshape(-1)
    assert units.tolist() == [float(u) for u in range(60)]  # every unit once, in order
    # the source outran its credits and paused at the bound (legitimate backpressure)
    assert dep.workers[0].stream_peak >= POLICY.max_buffered
    settle(dep)


def test_over_http_a_stall_is_a_500_server_error(dep):
    app = create_app(LocalBackend(dep), ServerSettings(api_key=None, timeout=600))
    response = TestClient(app).post("/generate", json={"mode": "cycle"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error"
    assert "stalled" in error["message"] and "node 'ping'" in error["message"]
    settle(dep)
