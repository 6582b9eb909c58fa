"""Two KV nodes in two partitions joined by a stream, as Qwen3-Omni's Thinker and Talker
(issue 15), co-located on one rank: the Talker (a KV node fed by the Thinker's rows) takes
the prompt's rows in its first window, keeps speaking after the Thinker stopped and stops
on its own end token (`RequestPlan.sampling["Talker"]`), never on the Thinker's sampling;
the two nodes hold pages of separate pools (per node in `WorkerStats` and `/metrics`); a
request that starts only the Thinker's partition reserves nothing in the Talker's engine.

Both nodes are testvla's tiny LLM module (dummy weights), declared here through the public
contract. Logits processors make the draws known: the Thinker's always picks `WORD`; the
Talker's never picks `WORD` before it has drawn `talk` ids, then must (its stop token)."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import pytest
import torch
from conftest import collect, finished, metric_total, settle, tokens, wait_for

from mstar.api_server.metrics import Metrics
from mstar.config import DeploymentConfig
from mstar.graph import ChunkPolicy, GraphNode, Loop, Partition, StreamingGraphEdge, Walk
from mstar.model import Done, Model, RequestPlan, SamplingParams, WalkStep
from mstar.model.sampling import register_logits_processor
from mstar.plugins.registry import ModelSpec
from mstar.runtime.builder import LoadOptions
from mstar.runtime.local import LocalDeployment
from mstar.serving.backends import LocalBackend
from mstar_testvla.config import PRESETS, TestVLAConfig
from mstar_testvla.model import TestVLA

pytestmark = pytest.mark.timeout(120)

WORD = 7  # the Thinker's every token, and the Talker's end token
PROMPT = [40, 41, 42, 43, 44]
#: The Talker's first window: the prompt's rows and the first generated token's row.
POLICY = ChunkPolicy(window=1, hop=1, emit=(0, 1), max_buffered=2,
                     first_chunk_param="talker_first_rows", continue_after_end=True)
HELD, RELEASE = threading.Event(), threading.Event()  # "hold": pauses the rank once


def _only_word(history, logits: torch.Tensor) -> torch.Tensor:
    out = torch.full_like(logits, float("-inf"))
    out[WORD] = 0.0
    return out


def _talk_then_stop(talk: int):
    def processor(history, logits: torch.Tensor) -> torch.Tensor:
        if len(history) < talk:  # the Talker's own site's history, not the Thinker's
            return logits.index_fill(0, torch.tensor([WORD]), float("-inf"))
        return _only_word(history, logits)
    return processor


def _hold(history, logits: torch.Tensor) -> torch.Tensor:
    """At the Talker's fourth draw of the request that asks for it: stop the rank there
    until the test has looked at its pages."""
    if len(history) == 3 and not HELD.is_set():
        HELD.set()
        RELEASE.wait(timeout=60)
    return logits


register_logits_processor("duet_only_word", _only_word)
register_logits_processor("duet_talk_6", _talk_then_stop(6))
register_logits_processor("duet_hold", _hold)


class Duet(Model):
    config_class = TestVLAConfig
    presets = PRESETS

    def _llm(self) -> TestVLA:
        return TestVLA(self.config)

    def node_engine_types(self):
        return {"Thinker": "kv_cache", "Talker": "kv_cache"}

    def partitions(self):
        return [Partition("thinker", ("Thinker",)), Partition("talker", ("Talker",))]

    def streaming_edges(self):
        return [StreamingGraphEdge("Thinker", "Talker", {"mid_hidden": "hidden_rows"}, POLICY)]

    def kv_spec(self, node):
        spec = self._llm().kv_spec("LLM")
        if node == "Thinker":  # every row it ran goes to the Talker
            return dataclasses.replace(spec, outputs={**spec.outputs, "mid_hidden": "all"})
        return spec

    def graph_walks(self):
        thinker = dict(inputs=("input_ids",), outputs=("token_ids", "mid_hidden"),
                       emit=("token_ids",))
        return {
            "prefill": Walk(GraphNode("Thinker", **thinker),
                            control=("token_ids", "finished", "finish_reason")),
            "decode": Walk(Loop(GraphNode("Thinker", **thinker), until="finished",
                                carry={"token_ids": "input_ids"})),
            "talker": Walk(Loop(GraphNode("Talker", inputs=("input_ids",),
                                          outputs=("token_ids",), emit=("token_ids",),
                                          prepare=_talker_inputs),
                                until="finished", carry={"token_ids": "talked"}),
                           control=("finish_reason",)),
        }

    def build_submodule(self, node, ctx):
        return self._llm().build_submodule("LLM", ctx)

    def weight_spec(self, node):
        return self._llm().weight_spec("LLM")

    def process_prompt(self, request):
        thinker = SamplingParams(temperature=0, max_tokens=request["think"], ignore_eos=True,
                                 logits_processors=["duet_only_word"])
        talker = SamplingParams(temperature=0, stop_token_ids=[WORD], max_tokens=50,
                                ignore_eos=True,
                                logits_processors=["duet_talk_6", *request.get("hold", [])])
        first = {"thinker": WalkStep("prefill", inputs={"input_ids": torch.tensor(PROMPT)})}
        if request.get("speak", True):
            first["talker"] = WalkStep("talker")
        return RequestPlan(first_walks=first, params={"talker_first_rows": len(PROMPT) + 1},
                           sampling={"Thinker": thinker, "Talker": talker},
                           prompt_tokens=len(PROMPT))

    def next_walk(self, state, control):
        if state.walk == "prefill" and not control.get("finished"):
            return WalkStep("decode", inputs={"input_ids": control["token_ids"]})
        return Done(control.get("finish_reason") or "stop")

    def postprocess(self, outputs, state):
        from mstar import events
        from mstar.model import token_list

        if "token_ids" not in outputs:
            return []
        return [events.TextDelta(text="", token_ids=token_list(outputs["token_ids"]))]


def _talker_inputs(env: dict[str, Any], iteration: int | None) -> dict[str, Any]:
    """The prefill: one id per row of the first window; then the Talker's own last id (the
    rows of its later windows, one or, past the stream's end, none, go unused here)."""
    rows = env["hidden_rows"]
    if iteration == 0:
        return {"input_ids": torch.arange(rows.shape[0]) + 60}
    assert rows.dim() == 2 and rows.shape[0] <= 1
    return {"input_ids": env["talked"]}


@pytest.fixture(scope="module")
def dep():
    config = DeploymentConfig.model_validate({
        "model": "duet", "max_seq_len": 64, "request_timeout": 600,
        "kv_cache": {"num_pages": 32, "page_size": 4},
        "node_groups": [{"node_names": ["Thinker", "Talker"], "ranks": [0]}]})
    model = Duet(Duet.make_config(preset="tiny"))
    d = LocalDeployment(ModelSpec("duet", f"{__name__}:Duet"), model, config,
                        LoadOptions(load_format="dummy"))
    yield d
    d.close()


def grew(dep, run) -> tuple[Any, dict[str, int]]:
    before = dep.counters()
    out = run()
    return out, {k: v - before.get(k, 0) for k, v in dep.counters().items()
                 if v != before.get(k, 0)}


def test_the_talker_speaks_past_the_thinkers_end_and_stops_on_its_own_token(dep):
    evs, counts = grew(dep, lambda: collect(dep, {"think": 3}))
    finished(evs)
    ids = tokens(evs)
    # the Thinker: 3 tokens, all WORD (the Talker's stop token is not its own)
    assert ids.count(WORD) == 3 + 1
    # the Talker: its 6 own ids, then WORD (its stop token) ended its loop, though the
    # Thinker's rows ran out after 2 windows: 5 more invocations on empty windows
    assert len(ids) == 3 + 6 + 1
    assert counts["Talker.node_invocations"] == 7
    assert counts["Thinker.node_invocations"] == 3
    # its prefill took the prompt's 5 rows and the first token's at once, then one each
    assert counts["Talker.prompt_tokens_computed"] == len(PROMPT) + 1
    settle(dep)


def test_co_located_kv_nodes_hold_separate_pools(dep):
    worker = dep.workers[0]
    pools = {n: worker.engines[n].cache.pool for n in ("Thinker", "Talker")}
    assert pools["Thinker"] is not pools["Talker"]
    HELD.clear()
    RELEASE.clear()
    thread = threading.Thread(target=lambda: collect(dep, {"think": 3,
                                                           "hold": ["duet_hold"]}))
    thread.start()
    try:
        assert HELD.wait(timeout=60)
        pages = worker.node_pages()  # the rank is paused inside the Talker's sampling
        assert pages == {n: pools[n].num_used for n in pools}
        assert pages["Thinker"] > 0 and pages["Talker"] > 0
        assert worker.pages_in_use() == pages["Thinker"] + pages["Talker"]
    finally:
        RELEASE.set()
        thread.join(timeout=60)
    settle(dep)
    backend = LocalBackend(dep)
    wait_for(lambda: set(backend.stats()["node_pages_in_use"]) == {(0, "Thinker"),
                                                                   (0, "Talker")})
    text = Metrics(backend.stats).render().decode()
    for node in ("Thinker", "Talker"):
        assert metric_total(text, "mstar_node_kv_pages_in_use", node=node, rank="0") == 0


def test_a_request_without_the_talkers_partition_reserves_nothing_there(dep):
    talker = dep.workers[0].engines["Talker"]
    steps = len(talker.step_log)
    evs, counts = grew(dep, lambda: collect(dep, {"think": 4, "speak": False}))
    finished(evs)
    assert tokens(evs) == [WORD] * 4
    assert counts["Thinker.node_invocations"] == 4
    # the Talker's engine never planned a step for it (pages are reserved by steps)
    assert not any(k.startswith("Talker.") for k in counts)
    assert len(talker.step_log) == steps and talker.pages_in_use() == 0
    settle(dep)
