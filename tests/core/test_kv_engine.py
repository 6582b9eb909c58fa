"""The KV engine at the edge of its pages, on testvla's tiny LLM: forks of a preempted
sequence and forks whose copy-on-write page cannot be had yet, each giving the logits of a
roomy engine that never ran short."""

from __future__ import annotations

import torch

from mstar.config.deployment import SchedulerConfig
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.engine.kv_engine import KVEngine
from mstar.engine.work import NodeWork
from mstar.graph.primitives import GraphNode
from mstar.model.contract import Fork
from mstar.model.sampling import SamplingParams

PAGE = 4
NODE = GraphNode("LLM", inputs=("input_ids",), outputs=("logits",))
IDS = list(range(40, 60))


def engine(llm, pages: int) -> KVEngine:
    model, module = llm
    spec = model.kv_spec("LLM")
    return KVEngine("LLM", module, spec, KVCacheManager(PagePool(spec, pages, PAGE)),
                    max_seq_len=64, scheduler=SchedulerConfig(), prefix_caching=False)


def submit(e: KVEngine, rid: str, child: int, ids: list[int]) -> None:
    e.submit(NodeWork(rid, child, NODE, {"input_ids": torch.tensor(ids)}, seed=0,
                      sampling=SamplingParams()))


def step(e: KVEngine) -> dict[tuple[str, int], torch.Tensor]:
    """One step: the last-token logits of each invocation it finished."""
    out = {}
    for r in e.step():
        assert r.error is None, r.error
        out[(r.work.request_id, r.work.child)] = r.outputs["logits"][-1]
    return out


def drain(e: KVEngine) -> dict[tuple[str, int], torch.Tensor]:
    out: dict[tuple[str, int], torch.Tensor] = {}
    for _ in range(20):
        if not e.has_work():
            return out
        out.update(step(e))
    raise AssertionError("the engine did not finish its work")


def test_a_fork_of_a_preempted_sequence_is_rebuilt_from_history(llm):
    """A's prompt (3 pages) is preempted by B (5 of 6 pages); then A forks child 1 from it
    and both children decode: the fork starts as a preempted sequence and is rebuilt."""
    def run(e: KVEngine, pressure: bool) -> dict:
        submit(e, "A", 0, IDS[:10])
        drain(e)
        if pressure:
            submit(e, "B", 0, IDS[:20])
            drain(e)
            assert e.counters["preemptions"] == 1 and e.pages_in_use() == 5
        e.fork("A", Fork("LLM", length=9, child=1))
        if pressure:
            e.release("B")
        submit(e, "A", 0, [7])
        submit(e, "A", 1, IDS[9:10])
        return drain(e)

    want, got = run(engine(llm, 64), False), run(engine(llm, 6), True)
    assert got.keys() == want.keys() == {("A", 0), ("A", 1)}
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_a_fork_waits_for_its_copy_on_write_page(llm):
    """Children 1 and 2 share A's half-full second page with child 0; one free page is left.
    Child 1 copies the page and runs; the others' writes would need a copy that cannot be
    had, so they wait instead of writing into the shared page."""
    def run(e: KVEngine) -> dict:
        submit(e, "A", 0, IDS[:6])
        drain(e)
        for child in (1, 2):
            e.fork("A", Fork("LLM", length=5, child=child))
        for child in (1, 2):
            submit(e, "A", child, IDS[5:6])
        submit(e, "A", 0, [7])
        return step(e)

    roomy, tight = engine(llm, 64), engine(llm, 3)
    want, got = run(roomy), run(tight)
    assert len(want) == 3 and got.keys() == {("A", 1)}
    torch.testing.assert_close(got[("A", 1)], want[("A", 1)], atol=1e-5, rtol=0)
    tight.release("A")
    assert tight.pages_in_use() == 0 and not tight.has_work()


def test_a_request_that_cannot_fit_fails_whole_and_alone(llm):
    """Child 1 needs a page of a full pool that only its own request holds: the request
    fails (507, the cache's size named) with every task of it, child 0's too although its
    own half-full page had room; nothing of it runs after the failure."""
    e = engine(llm, 2)
    submit(e, "A", 0, IDS[:6])
    drain(e)
    e.fork("A", Fork("LLM", length=4, child=1))
    submit(e, "A", 1, IDS[4:5])
    submit(e, "A", 0, [7])
    results = e.step()
    assert sorted(r.work.child for r in results) == [0, 1]
    for r in results:
        assert r.error.code == 507
        assert str(r.error) == ("the KV cache of LLM cannot hold this request: its 2 pages "
                                "of 4 tokens hold 8 tokens")
    assert not e.has_work()
    e.release("A")
    assert e.pages_in_use() == 0


def test_a_raising_logits_processor_fails_its_request_alone(llm):
    """The forward is shared; the processor raises in sampling, after the K/V were
    committed: only its request fails, the other samples as in a batch of its own."""
    from mstar.model.sampling import register_logits_processor

    def explode(history, logits):
        raise RuntimeError("processor bug")

    register_logits_processor("test_kv_engine_explodes", explode)
    sampled = GraphNode("LLM", inputs=("input_ids",), outputs=("token_ids",))

    def run(e: KVEngine, rids: list[str]) -> dict:
        for rid in rids:
            bad = ["test_kv_engine_explodes"] if rid == "bad" else []
            e.submit(NodeWork(rid, 0, sampled, {"input_ids": torch.tensor(IDS[:6])}, seed=0,
                              sampling=SamplingParams(temperature=0, logits_processors=bad)))
        out = {r.work.request_id: r for r in e.step()}
        assert not e.has_work()
        return out

    want = run(engine(llm, 64), ["good"])["good"].outputs["token_ids"]
    both = run(engine(llm, 64), ["bad", "good"])
    assert str(both["bad"].error) == "processor bug"
    assert both["good"].error is None and torch.equal(both["good"].outputs["token_ids"], want)


def test_host_time_counts_every_step_that_ran_a_forward(llm):
    """`timing` accumulates per step that ran the node: its `forward` is the step log's
    forward time, and planning and the runner are timed beside it."""
    e = engine(llm, pages=32)
    for rid in ("A", "B"):
        submit(e, rid, 0, IDS[:6])
    drain(e)
    assert e.timing["steps"] == len(e.step_log) > 0
    assert e.timing["forward"] == sum(r.seconds for r in e.step_log)
    assert e.timing["schedule"] > 0 and e.timing["runner"] > 0
    e.step()  # nothing to run: not a step
    assert e.timing["steps"] == len(e.step_log)


def test_each_sampled_token_comes_from_its_own_last_logits_row(llm):
    """Sampling reads each sequence's row of the step's logits in place: in a step where a
    sequence that only returns logits sits between sampled ones, every greedy token is still
    the argmax of its own sequence's last logits."""
    sampled = GraphNode("LLM", inputs=("input_ids",), outputs=("token_ids", "logits"))
    e = engine(llm, pages=32)
    for rid, node, ids in (("S1", sampled, IDS[:5]), ("L", NODE, IDS[5:12]),
                           ("S2", sampled, IDS[12:15]), ("S3", sampled, IDS[3:9])):
        e.submit(NodeWork(rid, 0, node, {"input_ids": torch.tensor(ids)}, seed=0,
                          sampling=SamplingParams(temperature=0.0)))
    results = e.step()
    assert len(e.step_log) == 1 and len(results) == 4  # one step ran all four
    for r in results:
        assert r.error is None, r.error
        if "token_ids" in r.outputs:
            assert r.outputs["token_ids"].tolist() == [int(r.outputs["logits"][-1].argmax())]
    assert sorted(r.work.request_id for r in results if "token_ids" in r.outputs) == [
        "S1", "S2", "S3"]


def test_an_int_position_is_a_text_run_on_every_axis(llm):
    """`positions=p` means p, p+1, ... on every axis: the same logits as the explicit
    [A, n] tensor, and a negative start is refused naming positions."""
    import pytest

    from mstar.errors import RequestError

    def logits(positions) -> torch.Tensor:
        e = engine(llm, 32)
        inputs = {"input_ids": torch.tensor(IDS[:6])}
        if positions is not None:
            inputs["positions"] = positions
        e.submit(NodeWork("r", 0, NODE, inputs, seed=0, sampling=SamplingParams()))
        return drain(e)[("r", 0)]

    axes = llm[0].kv_spec("LLM").position_axes
    explicit = torch.arange(7, 13).expand(axes, 6)
    torch.testing.assert_close(logits(7), logits(explicit), rtol=0, atol=0)
    assert not torch.equal(logits(7), logits(None))  # 7.. is not the default 0..
    torch.testing.assert_close(logits(0), logits(None), rtol=0, atol=0)
    with pytest.raises(RequestError, match="positions"):
        logits(-1)


def test_batched_counters_count_sequences_that_shared_a_step(llm):
    """Two prompts in one step count as batched prompts; two scratch chunks in one step
    as batched scratch chunks; a step of one sequence counts nothing."""
    e = engine(llm, 64)
    submit(e, "A", 0, IDS[:6])
    drain(e)
    assert e.counters["batched_prompts"] == 0  # alone in its step
    submit(e, "B", 0, IDS[:5])
    submit(e, "C", 0, IDS[:7])
    drain(e)
    assert e.counters["batched_prompts"] == 2
    for rid in ("B", "C"):
        e.submit(NodeWork(rid, 0, NODE, {"input_ids": torch.tensor(IDS[:3]),
                                         "chunk_mode": "scratch"}, seed=0,
                          sampling=SamplingParams()))
    drain(e)
    assert e.counters["batched_scratch_chunks"] == 2 and e.counters["batched_prompts"] == 2
