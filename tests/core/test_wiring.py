"""One wiring: `mstar.load` and a served worker (`mstar serve`'s config resolution, then
`serving.proc`'s builder, called here in process) build the same engines from the same
packaged config: nodes per rank, engine types, KV pages, parameter devices and dtypes,
tensor-parallel ranks, the (seeded dummy) weights and every engine option."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mstar
from mstar.cli.serve import prepare
from mstar.engine.kv_engine import KVEngine
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions
from mstar.serving import proc


def summary(engines: dict) -> dict:
    """What an engine was built with, comparable across two builds."""
    out = {}
    for node, engine in engines.items():
        row = {"type": type(engine).__name__, "nvtx": engine.nvtx,
               "params": [(name, p.shape, p.device, p.dtype, float(p.detach().double().sum()))
                          for name, p in engine.module.named_parameters()],
               "buffers": [(name, b.device, b.dtype)
                           for name, b in engine.module.named_buffers()]}
        if isinstance(engine, KVEngine):
            pool = engine.cache.pool
            row.update(pages=pool.kv.shape[2], page_size=pool.kv.shape[3],
                       kv=(pool.kv.dtype, pool.kv.device), spec=engine.spec,
                       prefix_caching=engine.prefix_caching, tp_ranks=engine.tp_ranks,
                       eos=engine.eos_token_ids, max_seq_len=engine.max_seq_len,
                       scheduler=engine.scheduler, device=engine.device)
        else:
            row.update(max_batch=engine.max_batch,
                       cache_bytes=engine.cache.max_bytes if engine.cache else 0)
        out[node] = row
    return out


def served_spec(name: str, rank: int) -> proc.ProcessSpec:
    """The spec `mstar serve <name> --preset tiny --load-format dummy --enable-nvtx` hands
    worker `rank` (the launcher's fields that the wiring reads)."""
    settings, config = prepare(name, {"preset": "tiny", "load_format": "dummy",
                                      "enable_nvtx": True})
    return proc.ProcessSpec(
        role="worker", deployment_id="t", socket_prefix="/tmp/x", protocol="SHM",
        model=config.model, config=config.model_dump(), preset=settings.preset,
        load=dataclasses.asdict(LoadOptions.of(model_registry().get(config.model),
                                               load_format=settings.load_format)),
        rank=rank, enable_nvtx=settings.enable_nvtx)


@pytest.mark.parametrize("name", ["testvla_single", "testvla_node_split",
                                  "testvla_pd_disaggregated", "testvla_cfg_parallel",
                                  "testvla_stream_rank"])
def test_load_and_serve_build_the_same_engines(name):
    with mstar.load("testvla", name, preset="tiny", load_format="dummy",
                    enable_nvtx=True) as dep:
        assert dep.workers
        for rank, worker in dep.workers.items():
            wiring = proc.wiring(served_spec(name, rank))
            assert sorted(wiring.placement.nodes_on(rank)) == sorted(worker.engines)
            device, build = wiring.worker_engines(rank)
            assert device == worker.device
            served = build()
            assert summary(served) == summary(worker.engines), (name, rank)
            assert all(e.nvtx for e in served.values())


def test_tensor_parallel_ranks_are_wired_alike_and_load_says_it_needs_processes():
    """tp2 is served only (one process per rank); both its ranks get their TP shares from
    the same builder arguments, and `mstar.load` refuses it with a clear error."""
    for rank in (0, 1):
        wiring = proc.wiring(served_spec("testvla_tp2", rank))
        nodes = wiring.placement.nodes_on(rank)
        tp = {n: (p.ranks.index(rank), p.tp_size) for n, p in nodes.items() if p.tp_size > 1}
        assert tp and all(size == 2 for _, size in tp.values())
        assert {index for index, _ in tp.values()} == {rank}
        _, build = wiring.worker_engines(rank)
        assert build.keywords["enable_nvtx"] is True
        assert build.keywords["device"] == torch.device(wiring.devices.device(rank))
    with pytest.raises(ValueError, match="one process per rank"):
        mstar.load("testvla", "testvla_tp2", preset="tiny", load_format="dummy")


def test_each_tensor_parallel_group_meets_at_its_own_port_of_the_master(monkeypatch):
    """Two disjoint groups (the LLM's prefill on ranks 0-1, its decode on 2-3): group g,
    ordered by leader rank, rendezvous at `tp_host:(tp_port + g)` (`torch.distributed`'s
    init is recorded, not run: a real rendezvous needs a process per rank)."""
    import torch.distributed as dist

    from mstar.config import DeploymentConfig
    from mstar.runtime.builder import make_model
    from mstar.runtime.wiring import Wiring

    config = DeploymentConfig.model_validate({
        "model": "testvla", "max_seq_len": 128, "node_groups": [
            {"node_names": ["LLM"], "ranks": [2, 3], "tp_size": 2,
             "graph_walks": ["decode", "denoise", "rollout", "plan"]},
            {"node_names": ["LLM"], "ranks": [0, 1], "tp_size": 2,
             "graph_walks": ["prefill", "prefill_act", "prefill_rollout", "prefill_plan"]},
            {"node_names": ["vision_encoder", "action_init", "combine", "cem_sample",
                            "cem_refit", "consumer"], "ranks": [0]}]})
    options = LoadOptions(load_format="dummy")
    model = make_model(model_registry().get("testvla"), {}, preset="tiny", options=options)
    wiring = Wiring(model, config, options)
    assert wiring.tp_groups() == [(0, 1), (2, 3)]
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(
        (kw["init_method"], kw["rank"], kw["world_size"])))
    for rank in range(4):
        wiring.join_tp_group(rank, 7000, "10.0.0.1")
    assert joined == [("tcp://10.0.0.1:7000", 0, 2), ("tcp://10.0.0.1:7000", 1, 2),
                      ("tcp://10.0.0.1:7001", 0, 2), ("tcp://10.0.0.1:7001", 1, 2)]
