"""The KV cache under pressure and at its limits: `n > 1` completions (forks sharing their
prompt's pages) preempted and rebuilt give the tokens of an unpressured run, in process and
through the OpenAI chat route; a request whose completions can never fit together is a 400
at admission; a configured cache smaller than one max_seq_len sequence never starts."""

from __future__ import annotations

import pytest
from conftest import collect, finished, run_concurrently, settle, tokens

import mstar
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
        assert len(completions(collect(d, sampled(0, 4, 24)), 4)) == 4  # 4 x 24 fit
        settle(d)


def test_a_cache_smaller_than_one_sequence_does_not_start():
    with pytest.raises(ConfigError, match=r"kv_cache.num_pages: 31 pages .* at least 32"):
        mstar.load("testvla", **TINY, kv_cache={"num_pages": 31, "page_size": 4})
