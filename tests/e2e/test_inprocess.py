"""The runtime heart end to end, in one process, on the testvla plugin: continuous batching
across walks, sampling keyed per request, cancels and bad input, page accounting."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import (
    collect,
    finished,
    frame,
    image,
    run_concurrently,
    settle,
    tensors,
    tokens,
    wait_for,
)

import mstar
from mstar import events
from mstar.communication import messages as msg


@pytest.fixture(scope="module")
def dep(tiny_ckpt):
    d = mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                   kv_cache={"num_pages": 256, "page_size": 4})
    yield d
    d.close()


def text_req(prompt: str = "hello", **kw) -> dict:
    return {"prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}


def act_req(seed: int = 5, **kw) -> dict:
    return {"prompt": "<image>pick up", "image": image(1), "mode": "act", "num_steps": 4,
            "guidance_scale": 2.0, "seed": seed, **kw}


def test_text_image_act_rollout_modes(dep):
    evs = collect(dep, text_req("look <image> here", image=image(0)))
    assert len(tokens(evs)) == 8 and finished(evs).reason == "length"
    assert finished(evs).usage.completion_tokens == 8
    act = collect(dep, act_req())
    (actions,) = tensors(act, "actions")
    assert actions.shape == (4, 4) and torch.isfinite(actions).all()
    roll = collect(dep, {"prompt": "go", "mode": "rollout", "num_frames": 3, "frame": frame(0)})
    assert [t.shape for t in tensors(roll, "frame")] == [(4, 8)] * 3
    settle(dep)


def test_walks_of_three_requests_share_one_llm_forward(dep):
    """A decode step, a denoise step and a prefill of three requests in one forward, each
    output equal to its solo run: walks run by per-request cursors, not an interpreter."""
    a_req = text_req("decoding for a while", max_tokens=60, ignore_eos=True)
    b_req = act_req(num_steps=40)
    c_req = text_req("late arrival", max_tokens=4)
    solo = {k: collect(dep, r) for k, r in (("a", a_req), ("b", b_req), ("c", c_req))}
    settle(dep)
    before = len(dep.step_log("LLM"))
    results: dict[str, list] = {}

    def run(key, req):
        results[key] = collect(dep, req)

    ta = threading.Thread(target=run, args=("a", a_req))
    ta.start()
    wait_for(lambda: any(e["walk"] == "decode" for s in dep.step_log("LLM")[before:]
                         for e in s.entries))
    tb = threading.Thread(target=run, args=("b", b_req))
    tb.start()
    wait_for(lambda: any(e["walk"] == "denoise" for s in dep.step_log("LLM")[before:]
                         for e in s.entries))
    tc = threading.Thread(target=run, args=("c", c_req))
    tc.start()
    for t in (ta, tb, tc):
        t.join(timeout=60)
    shared = [s for s in dep.step_log("LLM")[before:]
              if {"prefill", "decode", "denoise"} <= {e["walk"] for e in s.entries}]
    assert shared, "no LLM forward held a prefill, a decode step and a denoise step"
    assert len({e["request_id"] for e in shared[0].entries}) >= 3
    assert tokens(results["a"]) == tokens(solo["a"])
    assert tokens(results["c"]) == tokens(solo["c"])
    torch.testing.assert_close(tensors(results["b"], "actions")[0],
                               tensors(solo["b"], "actions")[0], atol=1e-5, rtol=1e-5)
    settle(dep)


def test_a_decode_step_reaches_the_frontend_as_one_message(dep):
    """The worker sends a loop turn's outputs as one `Outputs` per frontend: the tokens of
    a decode step of several requests travel together (one encode, one wake-up of the
    frontend), and every token still reaches its own request, in order."""
    reqs = [text_req(f"prompt number {i}", max_tokens=40, ignore_eos=True) for i in range(4)]
    solo = [tokens(collect(dep, r)) for r in reqs]
    settle(dep)
    token_outputs: list[int] = []  # per `Outputs` message: how many carry token ids
    handle = dep.frontend.handle

    def observe(m: msg.Message) -> None:
        if isinstance(m, msg.Outputs):
            token_outputs.append(sum("token_ids" in o.tensors or "token_ids" in o.host
                                     for o in m.items))
        handle(m)

    before = len(dep.step_log("LLM"))
    dep.frontend.handle = observe
    try:
        together = run_concurrently(dep, reqs)
    finally:
        del dep.frontend.handle
    assert [tokens(evs) for evs in together] == solo
    widest = max(sum(e["walk"] == "decode" for e in s.entries)
                 for s in dep.step_log("LLM")[before:])
    assert widest >= 2, "the requests never decoded in one step"
    assert max(token_outputs) >= widest
    assert sum(token_outputs) == sum(len(t) for t in solo)  # one output per token
    settle(dep)


def test_seeded_sampling_is_batch_independent_and_children_differ(dep):
    req = text_req("sample me", temperature=1.0, top_p=0.9, seed=1234, max_tokens=12,
                   ignore_eos=True)
    alone = tokens(collect(dep, req))
    others = [text_req(f"noise {i}", temperature=0.7, seed=i, max_tokens=10 + i)
              for i in range(5)]
    together = run_concurrently(dep, [*others[:2], req, *others[2:]])
    assert tokens(together[2]) == alone
    again = tokens(collect(dep, {**req, "seed": 1235}))
    assert again != alone
    n2 = collect(dep, {**req, "n": 3})
    children = [tokens(n2, i) for i in range(3)]
    assert all(len(c) == 12 for c in children)
    assert len({tuple(c) for c in children}) == 3, children
    greedy = collect(dep, text_req("same for all", max_tokens=6, n=3, ignore_eos=True))
    assert tokens(greedy, 1) == tokens(greedy, 2) == tokens(greedy, 0) == tokens(
        collect(dep, text_req("same for all", max_tokens=6, ignore_eos=True)))
    assert finished(greedy).usage.completion_tokens == 18
    settle(dep)


def test_logprobs(dep):
    evs = collect(dep, text_req(logprobs=3, max_tokens=3))
    deltas = [e for e in evs if isinstance(e, events.TextDelta)]
    assert all(e.logprobs and len(e.logprobs[0].top) == 3 for e in deltas)
    for e in deltas:  # greedy: the chosen token is the most likely one
        assert e.logprobs[0].token_id == e.logprobs[0].top[0][0]
        assert e.logprobs[0].logprob <= 0
    settle(dep)


@pytest.mark.parametrize("bad, field", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"mode": "act", "num_steps": 0, "prompt": "<image>x", "image": image(0)}, "num_steps"),
    ({"mode": "act", "num_steps": 10**9, "prompt": "<image>x", "image": image(0)}, "num_steps"),
    ({"mode": "act", "cfg_interval": [0.8, 0.2], "prompt": "x"}, "cfg_interval"),
    ({"mode": "act", "cfg_interval": [0.5], "prompt": "x"}, "cfg_interval"),
    ({"prompt": "x" * 400}, "max_seq_len"),
    ({"max_tokens": 10_000}, "max_tokens"),
])
def test_bad_input_is_a_clear_error(dep, bad, field):
    with pytest.raises(mstar.RequestError) as err:
        collect(dep, text_req(**bad))
    assert field in str(err.value)
    assert tokens(collect(dep, text_req(max_tokens=2)))  # the deployment still serves
    settle(dep)


def test_cancel_mid_decode_leaves_the_batch_unaffected(dep):
    results: list = []
    bystander = threading.Thread(target=lambda: results.append(
        collect(dep, text_req("bystander", max_tokens=30, ignore_eos=True))))
    bystander.start()
    stream = dep.generate(text_req("cancel me", max_tokens=200, ignore_eos=True),
                          request_id="cancel-decode")
    next(stream), next(stream)
    stream.close()  # the client goes away mid-decode
    bystander.join(timeout=60)
    assert len(tokens(results[0])) == 30 and finished(results[0]).reason == "length"
    settle(dep)
    decoded = sum(e["request_id"] == "cancel-decode" for s in dep.step_log("LLM")
                  for e in s.entries)
    assert decoded < 200


def test_cancel_mid_denoise_stops_the_loop(dep):
    before = len(dep.step_log("LLM"))
    it = dep.generate(act_req(num_steps=800), request_id="to-cancel")
    wait_for(lambda: sum(e["request_id"] == "to-cancel" for s in dep.step_log("LLM")[before:]
                         for e in s.entries) >= 3)
    dep.cancel("to-cancel")
    evs = list(it)
    assert isinstance(evs[-1], events.Finished) and evs[-1].reason == "abort"
    settle(dep)
    ran = sum(e["request_id"] == "to-cancel" for s in dep.step_log("LLM")[before:]
              for e in s.entries)
    assert ran < 800


def test_unknown_model_preset_and_load_format(tiny_ckpt):
    with pytest.raises(KeyError, match="testvla"):
        mstar.load("no-such-model")
    with pytest.raises(ValueError, match="tiny"):
        mstar.load("testvla", preset="huge", load_format="dummy")
    with pytest.raises(ValueError, match="dummy"):
        mstar.load("testvla", preset="tiny", load_format="pickle")


def test_logits_processor_hook_and_ignore_eos(dep):
    from mstar.model.sampling import register_logits_processor

    def only_x(history, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[..., ord("x")] = 0.0
        return forced

    register_logits_processor("test_only_x", only_x)
    evs = collect(dep, text_req(logits_processors=["test_only_x"], max_tokens=5))
    assert tokens(evs) == [ord("x")] * 5
    with pytest.raises(mstar.RequestError, match="test_no_such_processor"):
        collect(dep, text_req(logits_processors=["test_no_such_processor"]))

    def only_eos(history, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[..., 257] = 0.0
        return forced

    register_logits_processor("test_only_eos", only_eos)
    stopped = collect(dep, text_req(logits_processors=["test_only_eos"], max_tokens=5))
    assert tokens(stopped) == [257] and finished(stopped).reason == "stop"
    ignored = collect(dep, text_req(logits_processors=["test_only_eos"], max_tokens=5,
                                    ignore_eos=True))
    assert tokens(ignored) == [257] * 5 and finished(ignored).reason == "length"
    settle(dep)


def test_async_generate(dep):
    import asyncio

    async def main():
        stream = dep.agenerate(text_req("async", max_tokens=5))
        return [e async for e in stream]

    evs = asyncio.run(main())
    assert tokens(evs) == tokens(collect(dep, text_req("async", max_tokens=5)))
    settle(dep)


def test_requests_touch_only_their_partitions(dep):
    before = len(dep.step_log("consumer"))
    collect(dep, text_req())
    collect(dep, text_req(stream_consumer=True, max_tokens=6))
    consumer_steps = dep.step_log("consumer")[before:]
    assert consumer_steps, "the streaming request never reached the consumer"
    assert len({e["request_id"] for s in consumer_steps for e in s.entries}) == 1
    settle(dep)


def test_request_timeout_frees_everything(tiny_ckpt):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    request_timeout=0.3) as d:
        evs = collect(d, act_req(num_steps=1000))
        assert isinstance(evs[-1], events.Error) and evs[-1].code == 504
        assert "timed out" in evs[-1].message
        assert finished(collect(d, text_req(max_tokens=2))).reason == "length"
        settle(d)


def test_per_node_dtype_override(tiny_ckpt):
    groups = [{"node_names": ["vision_encoder"], "ranks": [0], "dtype": "bfloat16"},
              {"node_names": ["LLM", "action_init", "combine", "cem_sample", "cem_refit",
                              "consumer"], "ranks": [0]}]
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    node_groups=groups) as d:
        engines = d.workers[0].engines
        assert next(engines["vision_encoder"].module.parameters()).dtype == torch.bfloat16
        assert next(engines["LLM"].module.parameters()).dtype == torch.float32
        evs = collect(d, text_req("look <image> here", image=image(0), max_tokens=4))
        assert len(tokens(evs)) == 4
        settle(d)
