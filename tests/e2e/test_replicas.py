"""Data-parallel replicas behind one served API (`--dp-size 2`): a per-walk disaggregated
testvla layout (prefill on its first rank, decode on its second, the K/V migrating between
them) twice, on ranks 0-1 and 2-3. Concurrent requests spread over both replicas with the
single-replica deployment's outputs, and each request's walks stay inside its replica;
requests whose prompts share a first KV page go to one replica (its prefix cache hits);
a replica whose worker dies fails only its own requests while the other serves on and
`/health` says which replica is down. Per-rank counters (`/metrics`) prove where work ran.

`mstar.load(..., replicas=2)` runs the same routing in one process. One server for the
module; the last test kills one of its workers."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest
from conftest import collect, tokens
from serving_harness import Server

import mstar

CONFIG = "testvla_pd_disaggregated"  # rank 0: prefill walks; rank 1: decode
#: Prompts of 3, 5, 9 and 15 token ids (BOS + bytes): shorter than one KV page (16), so
#: routed by load only, and with distinct sums over any subsets, so the tokens each
#: replica computed identify which requests ran there.
SHORT = [{"prompt": p, "max_tokens": 6, "temperature": 0}
         for p in ("ab", "abcd", "abcdefgh", "abcdefghijklmn")]
#: Four prompts sharing their first KV page (BOS + 15 bytes), then differing.
SHARED = [{"prompt": f"a shared prefix {tail}", "max_tokens": 2, "temperature": 0}
          for tail in ("one", "two", "three", "four")]
#: A request that streams for many seconds (its consumer sleeps 50 ms per window).
LONG = {"max_tokens": 400, "ignore_eos": True, "stream": True, "stream_consumer": True,
        "consumer_delay_s": 0.05}


@pytest.fixture(scope="module")
def expected():
    """The single-replica deployment's tokens for `SHORT`, in one process."""
    with mstar.load("testvla", CONFIG, preset="tiny", load_format="dummy") as d:
        return [tokens(collect(d, req)) for req in SHORT]


def test_in_process_replicas_take_turns_and_keep_each_request_inside(expected):
    """`mstar.load(..., replicas=2)`: requests sent one after another alternate between the
    replicas (ties take turns) with the single replica's outputs, and each one's K/V
    migrates from its replica's prefill rank to the same replica's decode rank."""
    with mstar.load("testvla", CONFIG, preset="tiny", load_format="dummy", replicas=2) as d:
        assert [tokens(collect(d, req)) for req in SHORT] == expected
        computed = [d.counters(r).get("LLM.prompt_tokens_computed", 0) for r in range(4)]
        imported = [d.counters(r).get("LLM.kv_tokens_imported", 0) for r in range(4)]
    assert computed == [3 + 9, 0, 5 + 15, 0]
    assert imported == [0, 3 + 9, 0, 5 + 15]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("replicas"), "--config", CONFIG, "--preset",
                    "tiny", "--load-format", "dummy", "--dp-size", "2",
                    "--tensor-comm-protocol", "SHM")
    server.wait_healthy()
    yield server
    assert server.stop() == 0, server.output()
    server.assert_clean()


def per_rank(server: Server, metric: str, **labels: str) -> dict[int, float]:
    """A metric summed by rank over the samples carrying `labels`, read once every rank
    has reported what ended before this call."""
    server.wait_reported()
    out = dict.fromkeys(range(4), 0.0)
    for lab, value in server.samples(metric):
        if labels.items() <= lab.items():
            out[int(lab["rank"])] += value
    return out


def since(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    return {rank: after[rank] - before[rank] for rank in after}


@pytest.mark.timeout(120)
def test_concurrent_requests_spread_over_both_replicas_and_stay_inside_each(server,
                                                                           expected):
    computed0 = per_rank(server, "mstar_prompt_tokens_computed_total")
    imported0 = per_rank(server, "mstar_kv_tokens_imported_total")
    answers: list[httpx.Response | None] = [None] * len(SHORT)

    def one(i: int) -> None:
        answers[i] = httpx.post(server.url + "/generate", json=SHORT[i], timeout=60)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(SHORT))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for answer, want in zip(answers, expected):
        assert answer is not None and answer.status_code == 200, answer
        assert [t for e in answer.json()["events"] if e["event"] == "text_delta"
                for t in e["token_ids"]] == want
    computed = since(computed0, per_rank(server, "mstar_prompt_tokens_computed_total"))
    imported = since(imported0, per_rank(server, "mstar_kv_tokens_imported_total"))
    # Both replicas prefilled (ranks 0 and 2) and decoded (ranks 1 and 3) ...
    assert computed[0] > 0 and computed[2] > 0 and computed[1] == computed[3] == 0
    assert computed[0] + computed[2] == 3 + 5 + 9 + 15
    # ... and each request's K/V migrated to its own replica's decode rank.
    assert (imported[1], imported[3]) == (computed[0], computed[2])


@pytest.mark.timeout(120)
def test_prompts_sharing_a_first_page_go_to_one_replica(server):
    """Sent one after another, requests by load alone would take turns; by prefix they
    all run on one replica, whose prefix cache then serves their first page."""
    prefill = dict(node="LLM", walk="prefill")
    runs0 = per_rank(server, "mstar_node_invocations_total", **prefill)
    hits0 = per_rank(server, "mstar_prefix_cache_hit_tokens_total")
    for req in SHARED:
        assert server.generate(req).status_code == 200
    runs = since(runs0, per_rank(server, "mstar_node_invocations_total", **prefill))
    hits = since(hits0, per_rank(server, "mstar_prefix_cache_hit_tokens_total"))
    assert sorted((runs[0], runs[2])) == [0, len(SHARED)], runs
    home = 0 if runs[0] else 2
    assert hits[home] == 16 * (len(SHARED) - 1) and hits[2 - home] == 0


@pytest.mark.timeout(120)
def test_a_dead_replica_fails_only_its_requests_and_the_other_serves_on(server, expected):
    """One long request per replica (the second arrives while the first runs, so it goes
    to the other replica); replica 1's decode worker is killed: its request ends with a
    503 naming the worker, the other keeps streaming, new requests are served and
    `/health` reports the deployment degraded, naming the replica."""
    started = [threading.Event(), threading.Event()]
    failed, survived = threading.Event(), threading.Event()
    errors: dict[int, dict] = {}

    def watch(i: int) -> None:
        after = 0
        with httpx.stream("POST", server.url + "/generate", timeout=60,
                          json={**LONG, "prompt": f"long {i}"}) as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "error":
                    errors[i] = json.loads(line.removeprefix("data: "))
                    failed.set()
                    return
                elif line.startswith("data: ") and event == "text_delta":
                    started[i].set()
                    after += failed.is_set()
                    if after == 3:  # three more outputs after the other one failed
                        survived.set()
                        return

    threads = []
    for i in range(2):
        threads.append(threading.Thread(target=watch, args=(i,)))
        threads[-1].start()
        assert started[i].wait(timeout=30), f"request {i} produced no output"
    os.kill(server.worker_pids()["worker:3"], signal.SIGKILL)
    assert failed.wait(timeout=30) and survived.wait(timeout=30)
    for t in threads:
        t.join(timeout=30)
    (error,) = errors.values()
    assert error["code"] == 503 and "worker:3" in error["message"], error
    health = server.client.get("/health")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "degraded"
    assert "replica 1" in health.json()["detail"] and "worker:3" in health.json()["detail"]
    for req, want in zip(SHORT, expected):  # all on replica 0 now
        answer = server.generate(req)
        assert answer.status_code == 200, answer.text
        assert [t for e in answer.json()["events"] if e["event"] == "text_delta"
                for t in e["token_ids"]] == want
    assert server.proc.poll() is None
