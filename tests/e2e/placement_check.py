"""What each rank of a served deployment ran and holds, read from its `/metrics`, against
what its layout's YAML says: which rank runs which node in which walk, where prompts are
computed and where their K/V only arrives, and which rank holds which share of which node's
weights. The expectations come from the config's resolved placement, not from a table per
layout."""

from __future__ import annotations

from collections import defaultdict

from serving_harness import Server

from mstar.config import load_config, placement
from mstar.config.validate import Placement
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, make_model


def resolved(config_name: str, preset: str = "tiny") -> tuple[Placement, dict[str, str]]:
    """The placement a packaged layout resolves to, and the model's engine type per node."""
    config = load_config(config_name)
    model = make_model(model_registry().get(config.model), config.model_kwargs, preset=preset,
                       options=LoadOptions(load_format="dummy"))
    return placement(config, model), dict(model.node_engine_types())


def by_rank(server: Server, metric: str, *labels: str) -> dict[tuple, float]:
    """A metric's samples keyed by (rank, *labels)."""
    return {(int(lab["rank"]), *(lab[k] for k in labels)): value
            for lab, value in server.samples(metric)}


def check_placement(server: Server, config_name: str, *, prefill_walks: set[str],
                    single_rank_bytes: dict[str, tuple[int, int]],
                    own_context: frozenset[str] = frozenset(),
                    importing: frozenset[int] | None = None,
                    walks: set[str] | None = None) -> None:
    """Call once requests that ran every node of every walk have ended (of `walks` only,
    when given: the walks the requests took, where a model has more than a test runs).

    - Each (walk, node) ran on exactly the ranks the YAML places it on (a tensor-parallel
      node on every rank of its group, a CFG branch only on its own rank).
    - A KV-cache node computed prompt tokens exactly on the ranks placed for its
      `prefill_walks` or running an `own_context` branch (graph nodes that prefill a context
      of their own inside a later walk, as BAGEL's image-free `LLM_cfg_img`); a rank that
      runs any other of its graph nodes, and none of the prefill walks, imported K/V (a
      migrated request, a branch's forked prefix), and no other rank did (`importing`: the
      ranks that import instead, where a rank both prefills and receives a branch's fork).
    - Each rank holds exactly the nodes placed on it; of a node at tp_size t it holds
      1/t of the parameters tensor parallelism splits (`single_rank_bytes`: (all, split)
      bytes of each node built whole on one rank) and all of the others.
    """
    placed, engine_types = resolved(config_name)
    server.wait_reported()
    ran: dict[tuple[str, str], set[int]] = defaultdict(set)
    for (rank, node, walk), count in by_rank(server, "mstar_node_invocations_total",
                                             "node", "walk").items():
        if count > 0:
            ran[(walk, node)].add(rank)
    want = {key: set(p.ranks) for key, p in placed.nodes.items()
            if walks is None or key[0] in walks}
    assert dict(ran) == want, f"(walk, node) -> ranks that ran it: {dict(ran)}; placed: {want}"

    held = by_rank(server, "mstar_node_parameters_bytes", "node")
    split = by_rank(server, "mstar_node_sharded_parameters_bytes", "node")
    for rank in placed.ranks():
        on_rank = placed.nodes_on(rank)
        assert {n for r, n in held if r == rank} == set(on_rank), (rank, held)
        for node, p in on_rank.items():
            whole, whole_split = single_rank_bytes[node]
            assert split[(rank, node)] * p.tp_size == whole_split, (rank, node, split, whole_split)
            assert whole_split > 0 or p.tp_size == 1, (rank, node)
            assert held[(rank, node)] - split[(rank, node)] == whole - whole_split, (rank, node)

    computed = by_rank(server, "mstar_prompt_tokens_computed_total", "node")
    imported = by_rank(server, "mstar_kv_tokens_imported_total", "node")
    for node, kind in engine_types.items():
        if kind != "kv_cache":
            continue
        prefill, own, other = set(), set(), set()
        for (walk, name), p in placed.nodes.items():
            if p.module == node:
                kind = prefill if walk in prefill_walks else own if name in own_context \
                    else other
                kind.update(p.ranks)
        assert prefill, node
        for rank in {r for r, n in held if n == node}:
            got = (computed[(rank, node)] > 0, imported[(rank, node)] > 0)
            want = (rank in prefill | own,
                    rank in (other - prefill if importing is None else importing))
            assert got == want, (rank, node, computed, imported)
