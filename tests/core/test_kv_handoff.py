"""The KV engine's hand-off, on testvla's tiny LLM: the scheduler's `StepPlan` for a crafted
situation (two sequences, a token budget that cuts a prompt, a pool that forces a
preemption), decided without a forward; and the plans carried out by the runner under the
torch attention backend give what `KVEngine.step` gives."""

from __future__ import annotations

import torch

from mstar.config.deployment import SchedulerConfig
from mstar.engine.attention_torch import TorchAttention
from mstar.engine.kv_cache import KVCacheManager, PagePool
from mstar.engine.kv_engine import KVEngine
from mstar.engine.kv_scheduler import StepPlan
from mstar.engine.work import NodeWork, WorkResult
from mstar.graph.primitives import GraphNode
from mstar.model.sampling import SamplingParams

PAGE = 4
PROMPT = GraphNode("LLM", inputs=("input_ids",), outputs=("logits",))
DECODE = GraphNode("LLM", inputs=("input_ids",), outputs=("logits", "token_ids"))
IDS = list(range(40, 60))


def engine(llm, pages: int, budget: int) -> KVEngine:
    model, module = llm
    spec = model.kv_spec("LLM")
    return KVEngine("LLM", module, spec, KVCacheManager(PagePool(spec, pages, PAGE)),
                    max_seq_len=64, prefix_caching=False,
                    scheduler=SchedulerConfig(max_num_batched_tokens=budget))


def submit(e: KVEngine, rid: str, node: GraphNode, ids: list[int]) -> None:
    e.submit(NodeWork(rid, 0, node, {"input_ids": torch.tensor(ids)}, seed=0,
                      sampling=SamplingParams(temperature=0)))


def shape(plan: StepPlan) -> list[tuple[str, int, int, bool, bool]]:
    """Each entry as (request, chunk start, tokens, ends its invocation, samples)."""
    return [(p.key.request_id, p.start, p.take, p.is_last, p.samples) for p in plan.entries]


def plan(e: KVEngine) -> StepPlan:
    """The scheduler's next plan; deciding it runs no forward."""
    forwards = len(e.step_log)
    p = e.kv_scheduler.schedule()
    assert len(e.step_log) == forwards
    return p


def test_the_scheduler_plans_chunks_and_a_preemption_without_a_forward(llm):
    """Budget 8, 6 pages of 4 tokens. A's 10-token prompt runs in two chunks; then A's
    decode token and B's 16-token prompt share a step (B gets what the budget leaves);
    B's next chunk needs 2 pages with 1 free, so A (the other admitted request) is
    preempted, and its pages are dropped before anything runs."""
    e = engine(llm, pages=6, budget=8)
    submit(e, "A", PROMPT, IDS[:10])
    p1 = plan(e)
    assert shape(p1) == [("A", 0, 8, False, False)]
    assert p1.preempted == () and p1.failed == ()
    assert e.cache.capacity(p1.entries[0].key) == 8  # its pages are reserved by the plan
    e.runner.run(p1)
    p2 = plan(e)
    assert shape(p2) == [("A", 8, 2, True, False)]
    e.runner.run(p2)

    submit(e, "A", DECODE, [7])
    submit(e, "B", PROMPT, IDS[:16])
    p3 = plan(e)
    assert shape(p3) == [("A", 0, 1, True, True), ("B", 0, 7, False, False)]
    assert p3.preempted == ()
    e.runner.run(p3)
    assert e.pages_in_use() == 5

    p4 = plan(e)
    assert shape(p4) == [("B", 7, 8, False, False)]
    assert p4.preempted == ("A",) and e.counters["preemptions"] == 1
    a = next(s for k, s in e.seqs.items() if k.request_id == "A")
    assert a.needs_recompute and e.cache.length(a.key) == 0
    assert e.pages_in_use() == 4  # B's 4 pages; A's 3 were given back


def drive(e: KVEngine, by_plans: bool) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """The crafted situation above, then A decodes again (rebuilt from its history): every
    result, stepping with `KVEngine.step` or handing each plan to the runner."""
    def run() -> list[WorkResult]:
        if not by_plans:
            return e.step()
        p = e.kv_scheduler.schedule()
        return list(p.failed) + e.runner.run(p)

    out: list[WorkResult] = []
    submit(e, "A", PROMPT, IDS[:10])
    while e.has_work():
        out += run()
    submit(e, "A", DECODE, [7])
    submit(e, "B", PROMPT, IDS[:16])
    while e.has_work():
        out += run()
    submit(e, "A", DECODE, [8])
    while e.has_work():
        out += run()
    assert all(r.error is None for r in out)
    return [(r.work.request_id, r.outputs["logits"], r.outputs.get("token_ids")) for r in out]


def test_plans_run_by_the_runner_under_the_torch_backend_equal_the_engine_step(llm):
    """The same situation stepped by `KVEngine.step` and by plans handed to a runner whose
    attention backend is given explicitly: the same results, bit for bit; and they are the
    logits of a roomy engine that never chunks nor preempts (to float tolerance)."""
    stepped = drive(engine(llm, pages=6, budget=8), by_plans=False)
    e = engine(llm, pages=6, budget=8)
    built: list[int] = []

    def torch_backend(seqs, cache) -> TorchAttention:
        built.append(len(seqs))
        return TorchAttention(seqs, cache=cache)

    e.runner.backend = torch_backend
    handed = drive(e, by_plans=True)
    assert built == [len(s.entries) for s in e.step_log]  # every forward ran under it
    # A for B's prompt, then B (done, holding 4 of the 6 pages) for A's rebuild
    assert e.counters["preemptions"] == 2 and len(handed) == len(stepped) == 4
    for (rid, logits, tokens), (rid2, logits2, tokens2) in zip(stepped, handed):
        assert rid == rid2 and torch.equal(logits, logits2)
        assert (tokens is None and tokens2 is None) or torch.equal(tokens, tokens2)
    roomy = drive(engine(llm, pages=64, budget=2048), by_plans=False)
    def by_request(results: list) -> list:  # a step's order differs; a request's does not
        return sorted(results, key=lambda r: r[0])

    assert [r[0] for r in by_request(roomy)] == [r[0] for r in by_request(handed)] == [
        "A", "A", "A", "B"]
    for (_, logits, tokens), (_, want, want_tokens) in zip(by_request(handed),
                                                           by_request(roomy)):
        torch.testing.assert_close(logits[-1], want[-1], atol=1e-5, rtol=0)
        assert (tokens is None and want_tokens is None) or torch.equal(tokens, want_tokens)
