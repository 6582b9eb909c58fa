"""The KV cache under pressure and at its limits: `n > 1` completions (forks sharing their
prompt's pages) preempted and rebuilt give the tokens of an unpressured run, in process and
through the OpenAI chat route; a request whose completions can never fit together is a 400
at admission; a configured cache smaller than one max_seq_len sequence never starts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import collect, finished, run_concurrently, settle, tokens
from serving_harness import Server

import mstar
from mstar import events
from mstar.config import ConfigError

TINY = dict(preset="tiny", load_format="dummy", max_seq_len=128)
#: One max_seq_len sequence: 32 pages of 4 tokens.
TIGHT = {"num_pages": 32, "page_size": 4}


def sampled(i: int, n: int, max_tokens: int) -> dict:
    return {"prompt": f"request {i} forks", "n": n, "max_tokens": max_tokens,
            "temperature": 1.0, "seed": 100 + i, "ignore_eos": True}


def completions(evs, n: int) -> list[list[int]]:
    assert finished(evs).reason == "length", evs[-1]
    return [tokens(evs, k) for k in range(n)]


def test_forked_completions_survive_preemption_with_unpressured_tokens():
    reqs = [sampled(0, 4, 24), sampled(1, 2, 40), sampled(2, 3, 30), sampled(3, 2, 40),
            sampled(4, 4, 24)]
    with mstar.load("testvla", **TINY) as roomy:
        expected = [completions(collect(roomy, r), r["n"]) for r in reqs]
    with mstar.load("testvla", **TINY, kv_cache=TIGHT) as tight:
        got = [completions(e, r["n"]) for e, r in zip(run_concurrently(tight, reqs), reqs)]
        rebuilt = {e["child"] for s in tight.step_log("LLM") for e in s.entries
                   if e["walk"] == "recompute"}
        settle(tight)
    assert rebuilt - {0}, "no forked completion was preempted: the test does not test forks"
    assert all(len(set(map(tuple, c))) > 1 for c in got)  # the completions differ
    assert got == expected


def test_completions_that_cannot_fit_together_are_refused_at_admission():
    with mstar.load("testvla", **TINY, kv_cache=TIGHT) as d:
        with pytest.raises(mstar.RequestError, match="max_tokens") as err:
            collect(d, sampled(0, 4, 100))
        assert err.value.param == "max_tokens"
        assert "capacity of 128 tokens" in str(err.value)
        assert len(completions(collect(d, sampled(0, 4, 24)), 4)) == 4  # 31 of 32 pages
        settle(d)


def test_a_cache_smaller_than_one_sequence_does_not_start():
    with pytest.raises(ConfigError, match=r"kv_cache.num_pages: 31 pages .* at least 32"):
        mstar.load("testvla", **TINY, kv_cache={"num_pages": 31, "page_size": 4})


def text(evs, index: int) -> str:
    return "".join(e.text for e in evs if isinstance(e, events.TextDelta) and e.index == index)


@pytest.mark.timeout(120)
def test_eight_concurrent_n2_chats_through_http_give_unpressured_texts(tmp_path):
    """8 chats of n=2 at once need 8 x 15 pages of 4 tokens; the served cache has 32. The
    reference: the rendered prompts in process with a roomy cache."""
    srv = Server(tmp_path, "--config", "testvla_single", "--preset", "tiny", "--load-format",
                 "dummy", "--set", "max_seq_len=128", "--set", "kv_cache.num_pages=32",
                 "--set", "kv_cache.page_size=4")
    try:
        fields = {"n": 2, "max_tokens": 16, "temperature": 1.0, "ignore_eos": True}
        with mstar.load("testvla", **TINY) as roomy:
            expected = []
            for i in range(8):
                evs = collect(roomy, {"prompt": f"user: chat {i}\nassistant:", "seed": i,
                                      **fields})
                expected.append([text(evs, 0), text(evs, 1)])
        srv.wait_healthy()

        def chat(i: int) -> list[str]:
            reply = srv.client.post("/v1/chat/completions", json={
                "model": "testvla", "messages": [{"role": "user", "content": f"chat {i}"}],
                "seed": i, **fields})
            assert reply.status_code == 200, reply.text
            return [c["message"]["content"] for c in reply.json()["choices"]]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(chat, range(8)))
        srv.wait_reported()
        assert srv.metric('mstar_preemptions_total{node="LLM",rank="0"}') > 0
        assert got == expected
        too_big = srv.client.post("/v1/chat/completions", json={
            "model": "testvla", "messages": [{"role": "user", "content": "chat 0"}],
            **fields, "n": 4, "max_tokens": 100})
        assert too_big.status_code == 400, too_big.text
        error = too_big.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "max_tokens")
        assert "capacity of 128 tokens (kv_cache.num_pages=32 x page_size=4)" in error["message"]
        srv.wait_idle()
    finally:
        assert srv.stop() == 0, srv.output()
    srv.assert_clean()
