"""Data-parallel replicas without processes: the placement's expansion to global ranks (what
every worker builds, TP groups included), each rank's device, the router's choice
(least loaded, prefix affinity, dead replicas), and `--data-parallel-size` over the YAML.
Served behaviour (routing, affinity and a dead replica behind HTTP) is in
`tests/e2e/test_replicas.py`."""

from __future__ import annotations

import pytest
import yaml

from mstar.cli.serve import serve_main
from mstar.config import ConfigError, load_config, placement
from mstar.config.devices import device_plan
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, make_model
from mstar.runtime.routing import AFFINITY_SLACK, ReplicaRouter, prefix_key

TINY = ["--preset", "tiny", "--load-format", "dummy", "--validate-config"]


@pytest.fixture(scope="module")
def testvla():
    return make_model(model_registry().get("testvla"), {}, preset="tiny",
                      options=LoadOptions(load_format="dummy"))


def placed(model, name: str, replicas: int, devices: dict[int, str] | None = None):
    config = load_config(name).model_copy(update={"replicas": replicas, "devices": devices})
    return config, placement(config, model)


# ------------------------------------------------------------------------------------------
# Placement and devices


def test_replica_k_runs_the_layout_on_ranks_shifted_by_k_times_its_rank_count(testvla):
    _, where = placed(testvla, "testvla_pd_disaggregated", replicas=3)
    assert where.ranks() == [0, 1, 2, 3, 4, 5] and where.ranks_per_replica == 2
    assert [where.replica_of(r) for r in where.ranks()] == [0, 0, 1, 1, 2, 2]
    for walk, rank in (("prefill", 0), ("decode", 1)):
        assert [where.get(walk, "LLM", k).ranks for k in range(3)] == [
            (rank,), (rank + 2,), (rank + 4,)]
    for k in (1, 2):  # each rank builds what its replica-0 twin builds
        for base in (0, 1):
            assert sorted(where.nodes_on(base + 2 * k)) == sorted(where.nodes_on(base))
    with pytest.raises(KeyError, match="replica 3 does not exist"):
        where.get("prefill", "LLM", 3)


def test_each_replica_has_its_own_tensor_parallel_group(testvla):
    _, where = placed(testvla, "testvla_tp2", replicas=2)
    assert where.nodes_on(0)["LLM"].ranks == where.nodes_on(1)["LLM"].ranks == (0, 1)
    assert where.nodes_on(2)["LLM"].ranks == where.nodes_on(3)["LLM"].ranks == (2, 3)
    assert sorted(where.nodes_on(2)) == sorted(where.nodes_on(0))


def test_devices_of_replicas(testvla):
    config, where = placed(testvla, "testvla_node_split", replicas=2)
    assert device_plan(config, where, cuda_devices=0).devices == dict.fromkeys(range(4), "cpu")
    assert device_plan(config, where, cuda_devices=4).devices == {
        r: f"cuda:{r}" for r in range(4)}
    with pytest.raises(ConfigError, match="4 ranks but 2 visible CUDA"):
        device_plan(config, where, cuda_devices=2)
    # A mapping of one replica's ranks: each further replica takes the next GPUs.
    config, where = placed(testvla, "testvla_node_split", 2, {0: "cuda:0", 1: "cuda:0"})
    assert device_plan(config, where, cuda_devices=2).devices == {
        0: "cuda:0", 1: "cuda:0", 2: "cuda:1", 3: "cuda:1"}
    config, where = placed(testvla, "testvla_node_split", 3, {0: "cuda:1", 1: "cpu"})
    assert device_plan(config, where, cuda_devices=6).devices == {
        0: "cuda:1", 1: "cpu", 2: "cuda:3", 3: "cpu", 4: "cuda:5", 5: "cpu"}
    # A mapping of every rank is taken as written (here: both replicas share one GPU).
    every = dict.fromkeys(range(4), "cuda:0")
    config, where = placed(testvla, "testvla_node_split", 2, every)
    assert device_plan(config, where, cuda_devices=1).devices == every
    # One naming some ranks beyond replica 0 but not all is an error naming the missing.
    with pytest.raises(ConfigError, match=r"devices: rank\(s\) 3 have no device"):
        placed(testvla, "testvla_node_split", 2, {0: "cpu", 1: "cpu", 2: "cpu"})


# ------------------------------------------------------------------------------------------
# Routing


def test_least_loaded_replica_ties_taking_turns():
    router = ReplicaRouter(3)
    assert [router.pick() for _ in range(3)] == [0, 1, 2]
    router.finished(1)
    assert router.pick() == 1  # the least loaded
    for k in (0, 1, 2):
        router.finished(k)
    assert [router.pick() for _ in range(3)] == [0, 2, 1]  # ties: least recently picked


def test_prefix_affinity_holds_while_the_load_is_within_the_slack():
    key = prefix_key(list(range(20)), page_size=16)
    assert key == prefix_key(list(range(16)) + [99], 16)  # only the first page counts
    assert prefix_key(list(range(15)), 16) is None  # no full page: nothing to share
    router = ReplicaRouter(2)
    home = router.pick(key)
    assert [router.pick(key) for _ in range(AFFINITY_SLACK)] == [home] * AFFINITY_SLACK
    assert router.pick(key) == 1 - home  # past the slack: the least loaded
    keys = {prefix_key([i] * 16, 16) for i in range(16)}
    homes = {ReplicaRouter(2).pick(k) for k in keys}
    assert homes == {0, 1}  # prefixes spread over the replicas


def test_a_dead_replica_is_out_of_rotation():
    router = ReplicaRouter(2)
    key = next(k for i in range(32) if (k := prefix_key([i] * 16, 16))
               and ReplicaRouter(2).pick(k) == 1)
    router.kill(1, "worker:1 died: gone")
    assert [router.pick(), router.pick(), router.pick(key)] == [0, 0, 0]
    router.kill(0, "worker:0 died: gone")
    assert router.pick() is None and router.live() == []


# ------------------------------------------------------------------------------------------
# The command line


def test_data_parallel_size_sets_replicas_over_the_yaml(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("MSTAR_DATA_PARALLEL_SIZE", raising=False)
    path = tmp_path / "deploy.yaml"
    path.write_text("model: testvla\nreplicas: 3\n")

    def replicas(*argv: str) -> int:
        assert serve_main(["--config", str(path), *argv, *TINY]) == 0
        return yaml.safe_load(capsys.readouterr().out)["replicas"]

    assert replicas() == 3
    assert replicas("--data-parallel-size", "2") == 2
    assert replicas("--dp-size", "4") == 4
    assert serve_main(["--config", str(path), "--dp-size", "0", *TINY]) == 1
    assert "--data-parallel-size: Input should be greater than or equal to 1" in \
        capsys.readouterr().err
