"""Placement by config in one process (several in-process workers), chunked prefill under
a token budget, preemption by recompute, streaming backpressure, and KV migration."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import audio, collect, finished, image, run_concurrently, settle, tensors, tokens

import mstar
from mstar import events
from mstar.engine.kv_engine import KVEngine

TEXT = {"prompt": "the image <image> shows", "image": image(3), "max_tokens": 10,
        "temperature": 0, "ignore_eos": True}
ACT = {"prompt": "<image>grasp", "image": image(4), "mode": "act", "num_steps": 3,
       "guidance_scale": 3.0, "seed": 9}
STREAM = {"prompt": "stream this", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
          "stream_consumer": True}

LM_NODES = ["LLM", "action_init", "combine", "cem_sample", "cem_refit"]


def outputs(dep) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    text, act, stream = (collect(dep, r) for r in (TEXT, ACT, STREAM))
    assert finished(text).reason == "length"
    return tokens(text), tensors(act, "actions")[0], audio(stream)


@pytest.fixture(scope="module")
def colocated(tiny_ckpt):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256) as d:
        yield outputs(d)


@pytest.mark.parametrize("groups", [
    [{"node_names": ["vision_encoder"], "ranks": [1]},
     {"node_names": [*LM_NODES, "consumer"], "ranks": [0]}],
    [{"node_names": ["vision_encoder"], "ranks": [1]}, {"node_names": LM_NODES, "ranks": [0]},
     {"node_names": ["consumer"], "ranks": [2]}],
    [{"node_names": ["vision_encoder"], "ranks": [0]},
     {"node_names": ["LLM"], "ranks": [0],
      "graph_walks": ["prefill", "prefill_act", "prefill_rollout", "prefill_plan"]},
     {"node_names": ["LLM"], "ranks": [1],
      "graph_walks": ["decode", "denoise", "rollout", "plan"]},
     {"node_names": ["action_init", "combine", "cem_sample", "cem_refit", "consumer"],
      "ranks": [1]}],
    [{"node_names": ["vision_encoder", *LM_NODES, "consumer"], "ranks": [0]},
     {"node_names": ["LLM_uncond"], "ranks": [1]}],
], ids=["vision-on-rank-1", "three-ranks", "prefill-decode-split", "cfg-branch-on-rank-1"])
def test_node_split_placement_gives_identical_outputs(tiny_ckpt, colocated, groups):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    node_groups=groups) as d:
        assert sorted(d.workers) == sorted({r for g in groups for r in g["ranks"]})
        for rank, worker in d.workers.items():  # each rank built exactly what it holds
            assert set(worker.engines) == {n.removesuffix("_uncond") for g in groups
                                           if rank in g["ranks"] for n in g["node_names"]}
        text, actions, wave = outputs(d)
        settle(d)
    assert text == colocated[0]
    torch.testing.assert_close(actions, colocated[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wave, colocated[2], atol=1e-5, rtol=1e-5)


def test_token_budget_smaller_than_the_image(tiny_ckpt, colocated):
    """An image of 16 patches with a budget of 6 tokens: text chunks are cut, the image's
    bidirectional segment runs whole and alone."""
    img_req = {**TEXT, "image": image(3, 16, 16)}
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256) as big:
        expected = tokens(collect(big, img_req))
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    scheduler={"max_num_batched_tokens": 6}) as d:
        got = tokens(collect(d, img_req))
        steps = [e for s in d.step_log("LLM") for e in s.entries if e["walk"] == "prefill"]
        settle(d)
    assert got == expected
    assert max(e["tokens"] for e in steps) == 16  # the image alone, past the budget
    assert len(steps) >= 4 and all(e["tokens"] <= 6 for e in steps if e["tokens"] != 16)


def test_chunked_prefill_and_preemption_give_the_oracles_tokens_and_logprobs(tiny_ckpt):
    """6 text requests at once (text is testvla's Llama path) with an 8-token budget (every
    prompt prefilled in chunks) and 8 pages of 16 for ~18 pages of sequences (preemption,
    rebuilt in chunks too): each greedy token and its top-5 log-probs are transformers'
    (each step recomputed from scratch) within 1e-4."""
    from mstar_testvla.oracle import greedy, llama_oracle

    prompts = [f"request number {i} says" for i in range(6)]
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=128,
                    kv_cache={"num_pages": 8, "page_size": 16},
                    scheduler={"max_num_batched_tokens": 8}) as tight:
        results = run_concurrently(tight, [{"prompt": p, "max_tokens": 24, "temperature": 0,
                                            "ignore_eos": True, "logprobs": 5}
                                           for p in prompts])
        entries = [e for s in tight.step_log("LLM") for e in s.entries]
        settle(tight)
    assert any(e["walk"] == "recompute" for e in entries), "no preemption: nothing tested"
    assert max(e["tokens"] for e in entries) <= 8
    oracle = llama_oracle(tiny_ckpt)
    for prompt, evs in zip(prompts, results):
        want, rows = greedy(oracle, [256, *prompt.encode()], 24)  # BOS + bytes
        assert tokens(evs) == want
        got = [lp for e in evs if isinstance(e, events.TextDelta) for lp in e.logprobs]
        for lp, row in zip(got, rows, strict=True):
            ids = [i for i, _ in lp.top]
            assert ids == row.topk(5).indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in lp.top]), row[ids],
                                       atol=1e-4, rtol=0)


def test_slow_consumer_pauses_only_its_producer(tiny_ckpt):
    """The consumer partition on its own rank, slower than its producer."""
    slow = {**STREAM, "max_tokens": 40, "consumer_delay_s": 0.03}
    fast = {"prompt": "meanwhile", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    groups = [{"node_names": ["vision_encoder", *LM_NODES], "ranks": [0]},
              {"node_names": ["consumer"], "ranks": [1]}]
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    node_groups=groups) as d:
        results: dict[str, list] = {}

        def run(name, req):
            results[name] = list(d.generate(req, request_id=name))

        threads = [threading.Thread(target=run, args=x) for x in (("slow", slow),
                                                                   ("fast", fast))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        peak = d.workers[0].stream_peak
        steps = [{e["request_id"] for e in s.entries} for s in d.step_log("LLM")]
        settle(d)
    slow_steps = [i for i, ids in enumerate(steps) if "slow" in ids]
    # while the slow request's producer waited for credit, the other one kept decoding
    assert any(ids == {"fast"} for ids in steps[slow_steps[0]:slow_steps[-1]])
    assert len(tokens(results["slow"])) == 40
    assert audio(results["slow"]).numel() == 40 * 4  # every unit emitted exactly once
    assert 10 <= peak <= 16  # the producer ran up to the bound and waited there


def test_cancelling_a_streaming_request_stops_its_producer(tiny_ckpt):
    slow = {**STREAM, "max_tokens": 200, "consumer_delay_s": 0.02}
    groups = [{"node_names": ["vision_encoder", *LM_NODES], "ranks": [0]},
              {"node_names": ["consumer"], "ranks": [1]}]
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    node_groups=groups) as d:
        stream = d.generate(slow, request_id="slow-stream")
        for event in stream:
            if isinstance(event, events.AudioChunk):
                break
        stream.close()
        settle(d)
        steps = sum(e["request_id"] == "slow-stream" for s in d.step_log("LLM")
                    for e in s.entries)
        marker = len(d.step_log("LLM"))
        collect(d, {"prompt": "after it", "max_tokens": 4})  # the engine steps on
        later = d.step_log("LLM")[marker:]
        assert later and all(e["request_id"] != "slow-stream" for s in later
                             for e in s.entries)
    assert steps < 60


def test_sequences_migrate_between_two_workers(tiny_ckpt):
    """Export a prefilled request's sequences (main and the CFG fork) from one worker's
    engine, import them into another's, and decode there: same tokens as staying put."""
    from mstar.engine.work import NodeWork
    from mstar.graph.primitives import GraphNode
    from mstar.model.contract import Fork
    from mstar.model.sampling import SamplingParams

    groups = [{"node_names": ["vision_encoder", "action_init", "combine", "cem_sample",
                              "cem_refit", "consumer"], "ranks": [0]},
              {"node_names": ["LLM"], "ranks": [1]}]
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256) as a, \
            mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                       node_groups=groups) as b:
        src, dst = a.kv_engine("LLM", 0), b.kv_engine("LLM", 1)
        a.workers[0].stop()  # drive the engines by hand
        b.workers[1].stop()
        greedy = SamplingParams(temperature=0, max_tokens=8)
        prompt = GraphNode("LLM", inputs=("input_ids",), outputs=("token_ids",))

        def run(engine: KVEngine, ids, child=0):
            engine.submit(NodeWork("r", child, prompt, {"input_ids": ids}, 0, greedy))
            while engine.has_work():
                results = engine.step()
            return int(results[0].outputs["token_ids"])

        first = run(src, list(range(60, 80)))
        src.fork("r", Fork("LLM", length=10, label="uncond"))
        moved = src.export_request("r")
        dst.import_request(moved)
        stay, go = [first], [first]
        for _ in range(6):
            stay.append(run(src, [stay[-1]]))
            go.append(run(dst, [go[-1]]))
        assert stay == go
        assert {m.state.key.label for m in moved} == {"main", "uncond"}
        # the destination computed no prompt: it imported the 20 + 10 tokens' K/V
        assert dst.counters["prompt_tokens_computed"] == 0
        assert dst.counters["kv_tokens_imported"] == 20 + 10
        assert src.counters["prompt_tokens_computed"] == 20
        assert src.invocations == {("LLM", ""): 7} and dst.invocations == {("LLM", ""): 6}
        src.release("r")
        dst.release("r")
        assert src.pages_in_use() == 0 and dst.pages_in_use() == 0
