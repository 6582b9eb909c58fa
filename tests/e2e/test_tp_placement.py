"""Tensor parallelism beside per-walk placement, served: a TP node's K/V leaves its group
whole and arrives split over the next one (a migration between walks from tp_size 2 to 1
and back, a CFG fork into a branch on another rank from or into a TP group), and prefix
caching stays on under TP. Every output equals the single-rank deployment's with prefix
caching off; the per-rank counters show who computed, imported and reused what."""

from __future__ import annotations

import pytest
from placement_check import by_rank, check_placement
from serving_harness import Server
from test_serving import ACT, REQUESTS, assert_same, decoded, summary

import mstar

PREFILL_WALKS = {"prefill", "prefill_act", "prefill_rollout", "prefill_plan"}
LATER_WALKS = "[decode, denoise, rollout, plan]"
OTHERS = "action_init, combine, cem_sample, cem_refit, consumer"

#: name -> (YAML, the ranks of its TP group that prefill, the ranks K/V arrives on)
LAYOUTS = {
    # The LLM prefills sharded over ranks 0 and 1 and continues whole on rank 2 (TP2 ->
    # TP1); each denoising step forks its CFG branch from rank 2 back into ranks 0 and 1.
    "tp2_then_tp1": (f"""
model: testvla
max_seq_len: 512
node_groups:
  - {{node_names: [vision_encoder], ranks: [0]}}
  - {{node_names: [LLM], ranks: [0, 1], tp_size: 2,
      graph_walks: [prefill, prefill_act, prefill_rollout, prefill_plan]}}
  - {{node_names: [LLM], ranks: [2], graph_walks: {LATER_WALKS}}}
  - {{node_names: [LLM_uncond], ranks: [0, 1], tp_size: 2}}
  - {{node_names: [{OTHERS}], ranks: [2]}}
""", (0, 1), frozenset({0, 1, 2})),
    # The reverse: prefilled whole on rank 0, continued sharded over ranks 1 and 2 (TP1 ->
    # TP2), whose leader forks the CFG branch out of its group, to rank 0.
    "tp1_then_tp2": (f"""
model: testvla
max_seq_len: 512
node_groups:
  - {{node_names: [vision_encoder], ranks: [0]}}
  - {{node_names: [LLM], ranks: [0],
      graph_walks: [prefill, prefill_act, prefill_rollout, prefill_plan]}}
  - {{node_names: [LLM], ranks: [1, 2], tp_size: 2, graph_walks: {LATER_WALKS}}}
  - {{node_names: [LLM_uncond], ranks: [0]}}
  - {{node_names: [{OTHERS}], ranks: [1]}}
""", (), frozenset({0, 1, 2})),
}


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    """Single rank, prefix caching off."""
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=512,
                    kv_cache={"enable_prefix_caching": False}) as d:
        return {name: summary(list(d.generate(req))) for name, req in REQUESTS.items()}


@pytest.fixture(scope="module")
def single_rank_bytes(tiny_ckpt) -> dict[str, tuple[int, int]]:
    with mstar.load("testvla", model_path=str(tiny_ckpt), max_seq_len=512) as d:
        return dict(d.workers[0].parameter_bytes)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tp_nodes_migrate_fork_and_hit_the_prefix_cache_across_groups(
        tmp_path, tiny_ckpt, expected, single_rank_bytes, layout):
    """The single-rank outputs without prefix caching, with each rank running, computing
    and importing what the layout places there (`check_placement`: every rank a sequence
    arrives on, TP followers included, counts the imported tokens). Repeated prompts then
    hit the prefix cache on every rank of a prefilling TP group alike."""
    yaml, prefill_group, importing = LAYOUTS[layout]
    config = tmp_path / f"testvla_{layout}.yaml"
    config.write_text(yaml)
    server = Server(tmp_path, "--config", str(config), "--model-path", str(tiny_ckpt),
                    "--tensor-comm-protocol", "SHM")
    try:
        server.wait_healthy()
        for name, request in [*REQUESTS.items(), ("act", ACT)]:  # ACT again: a hit
            response = server.generate(request)
            assert response.status_code == 200, response.text
            assert_same(summary(decoded(response.json())), expected[name])
        check_placement(server, str(config), prefill_walks=PREFILL_WALKS,
                        single_rank_bytes=single_rank_bytes, importing=importing)
        hits = by_rank(server, "mstar_prefix_cache_hit_tokens_total", "node")
        computed = by_rank(server, "mstar_prompt_tokens_computed_total", "node")
        if prefill_group:
            leader, follower = ((rank, "LLM") for rank in prefill_group)
            assert hits[leader] > 0 and hits[leader] == hits[follower], hits
            assert computed[leader] == computed[follower], computed
        server.wait_idle()
    finally:
        assert server.stop() == 0, server.output()
    server.assert_clean()
