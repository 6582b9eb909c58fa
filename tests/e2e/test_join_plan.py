"""A walk's children joined in one node invocation per round (`Join`), in the shape CEM
planning needs, on testvla's `plan` mode: N candidates each roll out from a fork of one
prefilled context -> the join (top-k, refit) -> re-fork, for I rounds. Checked against a
plain-torch CEM loop over testvla's reference with the same keyed noise, with per-rank
counters (one join per round, one context prefill), placement independence, cancellation
and the children cap."""

from __future__ import annotations

import pytest
import torch
from conftest import collect, frame, run_concurrently, settle, tensors, wait_for

import mstar
from mstar import events
from mstar.engine import rng
from tests.plugins.testvla.reference import Reference

SAMPLES, TOPK, ITERS, HORIZON = 6, 2, 3, 2
PLAN = {"prompt": "plan a path", "mode": "plan", "frame": frame(21), "goal": frame(22),
        "plan_samples": SAMPLES, "plan_topk": TOPK, "plan_iters": ITERS,
        "plan_horizon": HORIZON, "plan_std": 0.5, "seed": 9}


def reference_cem(ref: Reference, prompt_ids: list[int], request: dict
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The authors' CEM shape in plain torch over the reference (each candidate's rollout
    recomputed from the prompt): the final mean and each round's best score. Candidate c's
    noise in round r is the runtime's keyed draw (seed, child c, site "cem" of round r)."""
    dim = ref.c["frame_dim"]
    frame0, goal = torch.tensor(request["frame"]), torch.tensor(request["goal"])
    mean = torch.zeros(HORIZON, dim)
    std = torch.full((HORIZON, dim), request["plan_std"])
    best = []
    for r in range(ITERS):
        actions = torch.stack([mean + std * rng.randn(
            (HORIZON, dim), seed=request["seed"], child=c, site=rng.noise_site("cem", (), r),
            step=0) for c in range(SAMPLES)])
        finals = torch.stack([ref.rollout(prompt_ids, frame0, HORIZON + 1, actions=a)[-1]
                              for a in actions])
        scores = (finals - goal).abs().mean(dim=(1, 2))
        elite = actions[torch.argsort(scores, stable=True)[:TOPK]]
        mean, std = elite.mean(0), elite.std(0, correction=0)
        best.append(scores.min())
    return mean, best


@pytest.fixture(scope="module")
def dep(tiny_ckpt):
    d = mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                   kv_cache={"num_pages": 256, "page_size": 4})
    yield d
    d.close()


def test_plan_equals_plain_torch_cem_and_joins_once_per_round(dep, tiny_ckpt):
    before = dep.counters()
    llm_steps = len(dep.step_log("LLM"))
    evs = collect(dep, PLAN)
    settle(dep)
    assert isinstance(evs[-1], events.Finished) and evs[-1].reason == "stop"
    (plan,) = tensors(evs, "plan")
    scores = tensors(evs, "score")
    prompt_ids = dep.model.process_prompt(PLAN).params["prompt_ids"]
    mean, best = reference_cem(Reference(tiny_ckpt), prompt_ids, PLAN)
    torch.testing.assert_close(plan, mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.stack(scores), torch.stack(best), atol=1e-4, rtol=0)
    assert len(set(plan.flatten().tolist())) > 1  # a real refit, not the initial zeros

    ran = {k: v - before.get(k, 0) for k, v in dep.counters().items()}
    assert ran["cem_refit.node_invocations"] == ITERS  # the join: once per round
    assert ran["cem_sample.node_invocations"] == ITERS * SAMPLES
    assert ran["LLM_ctx.node_invocations"] == 1  # the context prefilled once ...
    assert ran["LLM.node_invocations"] == ITERS * SAMPLES * HORIZON
    assert ran["LLM.prompt_tokens_computed"] == len(prompt_ids)  # ... and never recomputed
    # Candidates of one round run concurrently: their rollout steps share LLM forwards.
    widest = max(sum(e["walk"] == "plan" for e in s.entries)
                 for s in dep.step_log("LLM")[llm_steps:])
    assert widest == SAMPLES


@pytest.mark.parametrize("groups", [
    [{"node_names": ["vision_encoder", "LLM", "action_init", "combine", "consumer"],
      "ranks": [0]}, {"node_names": ["cem_sample", "cem_refit"], "ranks": [1]}],
    [{"node_names": ["vision_encoder"], "ranks": [0]},
     {"node_names": ["LLM"], "ranks": [0], "graph_walks": ["prefill", "prefill_act",
                                                           "prefill_rollout", "prefill_plan"]},
     {"node_names": ["LLM"], "ranks": [1],
      "graph_walks": ["decode", "denoise", "rollout", "plan"]},
     {"node_names": ["action_init", "combine", "cem_sample", "cem_refit", "consumer"],
      "ranks": [1]}],
], ids=["join-on-rank-1", "context-migrates-to-rank-1"])
def test_plan_is_independent_of_placement_and_batching(dep, tiny_ckpt, groups):
    """The candidates' noise is keyed by (seed, child, site, round): the same plan placed
    otherwise (the sampler and the join called on another rank; or the context prefilled on
    rank 0 and its KV moved to rank 1, where the candidates fork it), run beside another
    plan, equals the plan run alone."""
    alone = tensors(collect(dep, PLAN), "plan")[0]
    other = {**PLAN, "seed": 10, "goal": frame(23)}
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    kv_cache={"num_pages": 256, "page_size": 4}, node_groups=groups) as split:
        both = run_concurrently(split, [PLAN, other])
        on_1 = split.counters(rank=1)
        assert on_1["cem_refit.node_invocations"] == 2 * ITERS
        if "LLM.kv_tokens_imported" in on_1:  # the kept context came over, once per plan
            prompt = len(split.model.process_prompt(PLAN).params["prompt_ids"])
            assert on_1["LLM.kv_tokens_imported"] == 2 * prompt
            assert on_1["LLM.node_invocations"] == 2 * ITERS * SAMPLES * HORIZON
        settle(split)
    torch.testing.assert_close(tensors(both[0], "plan")[0], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(tensors(both[1], "plan")[0], alone)
    settle(dep)


def test_cancel_mid_plan_stops_it_and_frees_every_child(dep):
    refits = len(dep.step_log("cem_refit"))
    stream = dep.generate({**PLAN, "plan_iters": 64}, request_id="plan-cancel")
    wait_for(lambda: len(dep.step_log("cem_refit")) > refits)  # a round was joined
    assert dep.pages_in_use() > 0
    dep.cancel("plan-cancel")
    evs = list(stream)
    assert isinstance(evs[-1], events.Finished) and evs[-1].reason == "abort"
    settle(dep)  # every child's pages (and the kept context's) are back
    assert len(dep.step_log("cem_refit")) - refits < 64


def test_children_beyond_the_cap_are_a_clear_400(tiny_ckpt):
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=256,
                    max_children=4) as d:
        evs = collect(d, PLAN)
        assert isinstance(evs[-1], events.Error) and evs[-1].code == 400
        assert "max_children=4" in evs[-1].message and "6 children" in evs[-1].message
        ok = collect(d, {**PLAN, "plan_samples": 4})
        assert isinstance(ok[-1], events.Finished)
        settle(d)
