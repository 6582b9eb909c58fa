"""Prefix caching and the encoder-output cache end to end, in one process, on testvla: hits
are counted, and every output equals a deployment's that has both caches off."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    collect,
    finished,
    image,
    metric_total,
    run_concurrently,
    settle,
    tokens,
    wait_for,
)

import mstar
from mstar import events
from mstar.api_server.metrics import Metrics
from mstar.serving.backends import LocalBackend

PAGE = 4
SYSTEM = "You are a careful assistant. Answer in one short sentence, plainly. "


def load(**overrides) -> mstar.runtime.local.LocalDeployment:
    return mstar.load("testvla", preset="tiny", load_format="dummy", max_seq_len=256,
                      **{"kv_cache": {"num_pages": 128, "page_size": PAGE}, **overrides})


@pytest.fixture(scope="module")
def cached():
    torch.manual_seed(0)
    with load() as d:
        yield d


@pytest.fixture(scope="module")
def plain():
    with load(kv_cache={"num_pages": 128, "page_size": PAGE, "enable_prefix_caching": False},
              encoder_cache_bytes=0) as d:
        yield d


def req(prompt: str, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, **kw}


def run(dep, request: dict) -> tuple[list[events.Event], dict[str, int]]:
    """The request's events and how much each counter grew while it ran."""
    before = dep.counters()
    evs = collect(dep, request)
    finished(evs)
    return evs, {k: v - before.get(k, 0) for k, v in dep.counters().items()}


def logprobs(evs: list[events.Event]) -> list[events.TokenLogprob]:
    return [lp for e in evs if isinstance(e, events.TextDelta) for lp in e.logprobs or []]


def same_outputs(a: list[events.Event], b: list[events.Event]) -> None:
    """Equal greedy tokens and top-2 candidates; logprobs equal up to float rounding (the
    reused K/V are the same bits, but a shorter computed suffix may round differently)."""
    assert tokens(a) == tokens(b) and len(tokens(a)) == 6
    la, lb = logprobs(a), logprobs(b)
    assert [[i for i, _ in lp.top] for lp in la] == [[i for i, _ in lp.top] for lp in lb]
    values = [[lp.logprob, *(v for _, v in lp.top)] for lp in la]
    torch.testing.assert_close(torch.tensor(values), torch.tensor(
        [[lp.logprob, *(v for _, v in lp.top)] for lp in lb]), rtol=0, atol=1e-5)


def test_a_shared_system_prompt_is_computed_once(cached, plain):
    first, second = req(SYSTEM + "What is a page?"), req(SYSTEM + "Why cache it?")
    _, grew = run(cached, first)
    assert grew["LLM.prompt_tokens_computed"] == 1 + len(first["prompt"])
    evs, grew = run(cached, second)
    n = 1 + len(second["prompt"])
    shared = 1 + len(SYSTEM) + len("Wh")  # BOS, the system prompt, "Wh"
    assert grew["LLM.prefix_cache_hit_tokens"] == shared // PAGE * PAGE
    assert grew["LLM.prompt_tokens_computed"] == n - shared // PAGE * PAGE
    run(plain, first)
    ref, grew = run(plain, second)
    assert grew["LLM.prefix_cache_hit_tokens"] == 0 and grew["LLM.prompt_tokens_computed"] == n
    same_outputs(evs, ref)
    settle(cached)


def test_another_image_shares_no_page_from_its_first_image_token(cached, plain):
    before = SYSTEM + "Look: "
    prompt = before + "<image> and say what it shows."
    pages_before_image = (1 + len(before)) // PAGE
    run(cached, req(prompt, image=image(11)))
    evs, grew = run(cached, req(prompt, image=image(12)))
    assert 0 < grew["LLM.prefix_cache_hit_tokens"] <= pages_before_image * PAGE
    assert grew["vision_encoder.node_invocations"] == 1
    assert grew["vision_encoder.encoder_cache_hits"] == 0
    ref, _ = run(plain, req(prompt, image=image(12)))
    same_outputs(evs, ref)
    settle(cached)


def test_the_same_image_twice_runs_the_encoder_once(cached, plain):
    before = "Describe "
    prompt = before + "<image> in a few words, please."
    first, grew_first = run(cached, req(prompt, image=image(21)))
    assert grew_first["vision_encoder.node_invocations"] == 1
    second, grew = run(cached, req(prompt, image=image(21)))
    assert grew["vision_encoder.node_invocations"] == 0
    assert grew["vision_encoder.encoder_cache_hits"] == 1
    # The image's bidirectional segment (4 patches) is reused whole, with the text after.
    n = 1 + len(prompt.replace("<image>", "")) + 4
    assert grew["LLM.prefix_cache_hit_tokens"] == (n - 1) // PAGE * PAGE
    assert grew["LLM.prefix_cache_hit_tokens"] > 1 + len(before) + 4
    same_outputs(second, first)
    ref, grew = run(plain, req(prompt, image=image(21)))
    assert "vision_encoder.encoder_cache_hits" not in grew
    same_outputs(second, ref)
    settle(cached)


def test_counters_reach_the_stats_and_metrics(cached):
    run(cached, req(SYSTEM + "Counted?"))
    backend = LocalBackend(cached)
    wait_for(lambda: {name: value for (_, name), value in backend.stats()["counters"].items()}
             == cached.counters(), timeout=5)
    text = Metrics(backend.stats).render().decode()
    counters = cached.counters()
    for metric, key in (("mstar_prefix_cache_hit_tokens_total", "LLM.prefix_cache_hit_tokens"),
                        ("mstar_prompt_tokens_computed_total", "LLM.prompt_tokens_computed"),
                        ("mstar_encoder_cache_hits_total",
                         "vision_encoder.encoder_cache_hits"),
                        ("mstar_node_invocations_total", "vision_encoder.node_invocations")):
        node = key.split(".")[0]
        assert metric_total(text, metric, node=node, rank="0") == counters[key]
    assert counters["LLM.prefix_cache_hit_tokens"] > 0
    settle(cached)


def test_preemption_under_a_tiny_cache_gives_the_oracles_tokens(tiny_ckpt):
    """Rebuilds start from cached pages; every greedy token is still transformers' (the
    text path is Llama)."""
    from mstar_testvla.oracle import greedy, llama_oracle

    prompts = [f"request number {i} says" for i in range(6)]
    # 6 requests of ~45 tokens need ~17 pages of 16; 8 pages force preemption.
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=128,
                    kv_cache={"num_pages": 8, "page_size": 16}) as tight:
        got = [tokens(e) for e in run_concurrently(tight, [
            {"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            for p in prompts])]
        recomputes = [e for s in tight.step_log("LLM") for e in s.entries
                      if e["walk"] == "recompute"]
        counters = tight.counters()
        settle(tight)
    assert recomputes, "the cache was never short: the test does not exercise preemption"
    assert counters["LLM.prefix_cache_hit_tokens"] > 0
    oracle = llama_oracle(tiny_ckpt)
    assert got == [greedy(oracle, [256, *p.encode()], 24)[0] for p in prompts]
