"""Devices: which device each rank runs on (with injected CUDA device counts, as this
machine has no GPU), the dtype and TP backend per device, the ranks sharing a device, the
CUDA KV budget (arithmetic, and the profiled forward with an injected memory reader), and
`mstar.load` and a served worker placing every rank alike."""

from __future__ import annotations

import logging

import pytest
import torch

import mstar
from mstar.config import ConfigError, load_config, placement, validate_for_model
from mstar.config import devices as devices_module
from mstar.config.deployment import KVCacheConfig, SchedulerConfig
from mstar.config.devices import (
    default_dtype,
    device_plan,
    gpus_problem,
    node_dtype,
    tp_backend,
)
from mstar.engine.kv_cache import device_kv_budget, plan_capacity
from mstar.engine.kv_profile import DeviceMemory, cuda_memory, measure_peak, profile_lengths
from mstar.model.contract import KVSpec
from mstar.model.forward import ForwardBatch
from mstar.plugins import model_registry
from mstar.runtime.builder import LoadOptions, make_model
from mstar.runtime.wiring import Wiring
from mstar.serving import proc

OPTIONS = LoadOptions(load_format="dummy")
GiB = 2**30


@pytest.fixture(scope="module")
def testvla():
    return make_model(model_registry().get("testvla"), {}, preset="tiny", options=OPTIONS)


def plan(model, name: str, cuda_devices: int, devices: dict[int, str] | None = None):
    config = load_config(name)
    if devices is not None:
        config = config.model_copy(update={"devices": devices})
    return device_plan(config, placement(config, model), cuda_devices=cuda_devices)


def problems(model, name: str, cuda_devices: int, devices: dict[int, str] | None = None):
    with pytest.raises(ConfigError) as info:
        plan(model, name, cuda_devices, devices)
    return info.value.problems


# ------------------------------------------------------------------------------------------
# Rank -> device


def test_rank_r_uses_cuda_r_when_cuda_is_visible(testvla):
    p = plan(testvla, "testvla_node_split", cuda_devices=4)
    assert p.devices == {0: "cuda:0", 1: "cuda:1"}
    assert [p.ranks_sharing(r) for r in (0, 1)] == [1, 1]


def test_each_node_numbers_its_own_gpus(testvla):
    """Across machines rank r is the i-th rank of its node, on that node's cuda:i: one GPU
    per node serves a rank per node, a TP group may span nodes on cuda:0 each, and ranks
    of two nodes never count as sharing a device."""
    for layout in ("testvla_node_split", "testvla_tp2"):
        config = load_config(layout).model_copy(update={"ranks_per_node": 1})
        p = device_plan(config, placement(config, testvla), cuda_devices=1)
        assert p.devices == {0: "cuda:0", 1: "cuda:0"}
        assert [p.ranks_sharing(r) for r in (0, 1)] == [1, 1]
    config = load_config("testvla_tp2").model_copy(update={"ranks_per_node": 2})
    with pytest.raises(ConfigError) as info:  # both ranks on the one node's single GPU
        device_plan(config, placement(config, testvla), cuda_devices=1)
    assert "2 ranks but 1 visible CUDA device" in info.value.problems[0]


def test_without_cuda_every_rank_is_on_the_cpu_said_once(testvla, caplog, monkeypatch):
    monkeypatch.setattr(devices_module, "_cpu_logged", False)
    with caplog.at_level(logging.INFO, logger="mstar.config.devices"):
        first = plan(testvla, "testvla_node_split", cuda_devices=0)
        plan(testvla, "testvla_tp2", cuda_devices=0)
    assert first.devices == {0: "cpu", 1: "cpu"}
    assert first.ranks_sharing(0) == 2  # the host's ranks share its memory, as before
    assert [r.message for r in caplog.records].count(
        "no CUDA device visible: every rank runs on the CPU") == 1


def test_a_mapping_places_ranks_and_is_the_sharing_rule(testvla):
    p = plan(testvla, "testvla_node_split", cuda_devices=2, devices={0: "cuda:1", 1: "cuda:1"})
    assert p.devices == {0: "cuda:1", 1: "cuda:1"}
    assert [p.ranks_sharing(r) for r in (0, 1)] == [2, 2]
    mixed = plan(testvla, "testvla_node_split", cuda_devices=1, devices={0: "cuda:0", 1: "cpu"})
    assert [mixed.ranks_sharing(r) for r in (0, 1)] == [1, 1]


# ------------------------------------------------------------------------------------------
# Bad input: each a ConfigError at start naming `devices`


def test_a_mapping_naming_a_device_that_does_not_exist(testvla):
    assert problems(testvla, "testvla_node_split", cuda_devices=2,
                    devices={0: "cuda:0", 1: "cuda:2"}) == [
        "devices.1: cuda:2 does not exist; visible: cuda:0..cuda:1"]
    assert problems(testvla, "testvla_node_split", cuda_devices=0,
                    devices={0: "cuda:0", 1: "cpu"}) == [
        "devices.0: cuda:0 does not exist; no CUDA device is visible"]


def test_gpus_naming_a_device_that_does_not_exist():
    # torch's count once CUDA_VISIBLE_DEVICES is the --gpus list (injected)
    assert gpus_problem("0,7,1", visible=1) == (
        "--gpus 0,7,1: device 7 does not exist (torch sees only 0); name devices this "
        "machine has")
    assert gpus_problem("7", visible=0).startswith(
        "--gpus 7: no CUDA device is available on this machine (torch sees none), or "
        "device 7 does not exist")
    assert gpus_problem("1,0", visible=2) is None


def test_more_ranks_than_devices_without_a_mapping(testvla):
    [problem] = problems(testvla, "testvla_node_split", cuda_devices=1)
    assert problem.startswith("devices: 2 ranks but 1 visible CUDA device(s)")
    assert "devices mapping" in problem


def test_a_tensor_parallel_group_spanning_device_kinds(testvla):
    [problem] = problems(testvla, "testvla_tp2", cuda_devices=1, devices={0: "cuda:0", 1: "cpu"})
    assert problem.startswith("devices: tensor-parallel group of ranks [0, 1] spans devices "
                              "of different kinds (cuda:0, cpu)")


def test_a_tensor_parallel_group_on_one_cuda_device(testvla):
    [problem] = problems(testvla, "testvla_tp2", cuda_devices=1,
                         devices={0: "cuda:0", 1: "cuda:0"})
    assert "puts two ranks on one CUDA device" in problem
    # on the CPU a whole group may share the host, as it does without a mapping
    assert plan(testvla, "testvla_tp2", 0, {0: "cpu", 1: "cpu"}).ranks_sharing(1) == 2


def test_config_validation_checks_the_mapping_itself(testvla):
    config = load_config("testvla_node_split").model_copy(
        update={"devices": {0: "gpu0", 2: "cpu"}})
    with pytest.raises(ConfigError) as info:
        validate_for_model(config, testvla)
    assert info.value.problems == [
        "devices.0: 'gpu0' is not a device; allowed: 'cpu' or 'cuda:<index>' (e.g. 'cuda:0')",
        "devices.2: no node group uses rank 2; ranks: 0, 1",
        "devices: rank(s) 1 have no device; a devices mapping names the device of every rank"]


# ------------------------------------------------------------------------------------------
# dtype and backend


def test_dtype_defaults_per_device_and_a_node_group_overrides():
    assert default_dtype("cuda:1") == "bfloat16"
    assert default_dtype("cpu") == "float32"
    assert node_dtype(None, "cuda:0") == "bfloat16"
    assert node_dtype("float32", "cuda:0") == "float32"
    assert node_dtype("bfloat16", "cpu") == "bfloat16"


def test_tp_backend_per_device_kind():
    assert tp_backend("cuda:3") == "nccl"
    assert tp_backend("cpu") == "gloo"


def test_a_kv_node_s_pages_are_held_in_its_dtype():
    groups = [{"node_names": ["LLM"], "ranks": [0], "dtype": "bfloat16"},
              {"node_names": ["vision_encoder", "action_init", "combine", "cem_sample",
                              "cem_refit", "consumer"],
               "ranks": [0]}]
    with mstar.load("testvla", preset="tiny", load_format="dummy", node_groups=groups,
                    max_seq_len=64, kv_cache={"num_pages": 8}) as dep:
        engine = dep.kv_engine("LLM")
        assert engine.cache.pool.k_cache(0).dtype == torch.bfloat16
        assert next(engine.module.parameters()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------
# The CUDA KV budget (vLLM's gpu_memory_utilization), with injected memory figures


SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8)  # 128 bytes per token in fp32


def test_budget_is_the_fraction_less_weights_and_activations_split_among_sharers():
    budget = device_kv_budget(80 * GiB, memory_fraction=0.9, ranks_sharing_device=2,
                              weights_bytes=10 * GiB, peak_activation_bytes=2 * GiB)
    assert budget == 80 * GiB * 0.9 / 2 - 12 * GiB
    page_bytes = SPEC.bytes_per_token() * 16
    pages = plan_capacity({"LLM": SPEC}, max_seq_len=64, page_size=16, num_pages=None,
                          memory_fraction=0.9, ranks_sharing_device=2, shares=None,
                          device="cpu", max_num_seqs=10**9, budget_bytes=budget)
    assert pages == {"LLM": int(budget // page_bytes)}


def test_too_little_memory_names_memory_fraction():
    with pytest.raises(ValueError, match=r"^kv_cache\.memory_fraction: 0\.1 of 16\.00 GiB"):
        device_kv_budget(16 * GiB, memory_fraction=0.1, ranks_sharing_device=1,
                         weights_bytes=2 * GiB, peak_activation_bytes=0)
    budget = device_kv_budget(16 * GiB, memory_fraction=0.5, ranks_sharing_device=1,
                              weights_bytes=8 * GiB - 1000, peak_activation_bytes=0)
    with pytest.raises(ValueError, match="raise kv_cache.memory_fraction"):  # < one sequence
        plan_capacity({"LLM": SPEC}, max_seq_len=64, page_size=16, num_pages=None,
                      memory_fraction=0.5, ranks_sharing_device=1, shares=None,
                      device="cpu", max_num_seqs=4, budget_bytes=budget)


def test_the_profile_step_fills_the_scheduler_s_token_budget():
    assert profile_lengths(SchedulerConfig(max_num_batched_tokens=200), 64) == [64, 64, 64, 8]
    assert profile_lengths(SchedulerConfig(max_num_batched_tokens=200, max_num_seqs=2),
                           64) == [64, 64]  # the most one step can hold
    assert profile_lengths(SchedulerConfig(max_num_batched_tokens=48), 64) == [48]


class CountingMemory:
    """A device reader for the CPU: the rank's tensors hold `weights` bytes, and a forward
    peaks at `per_token` bytes for each token a KV node ran since the last `reset_peak`
    (counted from the real forwards by a global forward hook)."""

    def __init__(self, total: int, weights: int, per_token: int):
        self.weights, self.per_token = weights, per_token
        self.tokens = 0
        self.forwards: list[int] = []  # tokens of each KV forward since the reset
        self.reader = DeviceMemory(total=lambda: total, allocated=lambda: self.weights,
                                   peak=lambda: self.weights + self.per_token * self.tokens,
                                   reset_peak=self._reset)

    def _reset(self) -> None:
        self.tokens, self.forwards = 0, []

    def hook(self, module, args) -> None:
        if args and isinstance(args[0], ForwardBatch):
            self.tokens += args[0].input_ids.numel()
            self.forwards.append(args[0].input_ids.numel())


def test_the_device_budget_subtracts_a_profiled_forward_at_the_token_budget(testvla):
    config = load_config("testvla_single").model_copy(update={
        "max_seq_len": 64, "scheduler": SchedulerConfig(max_num_batched_tokens=200),
        "kv_cache": KVCacheConfig(memory_fraction=0.5, enable_prefix_caching=False)})
    memory = CountingMemory(total=8 * 2**20, weights=2**20, per_token=1000)
    _, build = Wiring(testvla, config, OPTIONS).worker_engines(0)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(memory.hook)
    try:
        engines = build(memory=memory.reader)
    finally:
        handle.remove()
    assert memory.forwards == [200]  # one step of the scheduler's whole budget
    pool = engines["LLM"].cache.pool
    page_bytes = pool.spec.bytes_per_token() * pool.page_size
    budget = 8 * 2**20 * 0.5 - 2**20 - 200 * 1000
    assert pool.num_pages == int(budget // page_bytes)
    assert pool.num_used == 0 and not engines["LLM"].seqs  # nothing of the profile is left


def test_a_peak_is_what_a_run_held_beyond_what_was_allocated_before():
    held = {"now": 500, "peak": 0}

    def run():
        held["peak"] = held["now"] + 300

    reader = DeviceMemory(total=lambda: 0, allocated=lambda: held["now"],
                          peak=lambda: held["peak"], reset_peak=lambda: held.update(peak=0))
    assert measure_peak(run, reader) == 300


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_and_budget_on_a_gpu(testvla):
    device = torch.device("cuda:0")
    assert measure_peak(lambda: torch.empty(2**20, device=device), cuda_memory(device)) \
        >= 4 * 2**20
    config = load_config("testvla_single").model_copy(
        update={"devices": {0: "cuda:0"}, "kv_cache": KVCacheConfig(memory_fraction=0.5)})
    _, build = Wiring(testvla, config, OPTIONS).worker_engines(0)
    pool = build()["LLM"].cache.pool
    assert pool.kv.device == device and pool.num_pages > 0


# ------------------------------------------------------------------------------------------
# One placement for both paths


def test_load_and_a_served_worker_place_every_rank_alike(testvla):
    config = load_config("testvla_node_split")
    where = placement(config, testvla)
    expected = device_plan(config, where)
    with mstar.load("testvla", "testvla_node_split", preset="tiny",
                    load_format="dummy") as dep:
        assert sorted(dep.workers) == where.ranks() == [0, 1]
        for rank, worker in dep.workers.items():
            spec = proc.ProcessSpec(
                role="worker", deployment_id="t", socket_prefix="/tmp/x", protocol="SHM",
                model="testvla", config=dep.config.model_dump(), preset="tiny", rank=rank,
                load={"load_format": "dummy"})
            device, build = proc.wiring(spec).worker_engines(rank)
            assert device == worker.device == torch.device(expected.device(rank))
            bound = worker._build_engines.keywords  # what mstar.load bound for this rank
            assert build.keywords["device"] == bound["device"] == device
            assert build.keywords["ranks_sharing_device"] == bound["ranks_sharing_device"] \
                == expected.ranks_sharing(rank)
            served = build()
            assert sorted(served) == sorted(worker.engines)
            for node, engine in served.items():
                mine = [(p.device, p.dtype) for p in engine.module.parameters()]
                theirs = [(p.device, p.dtype) for p in worker.engines[node].module.parameters()]
                assert mine == theirs, (rank, node)


def test_load_device_puts_every_rank_there_through_the_same_checks():
    with mstar.load("testvla", "testvla_node_split", preset="tiny", load_format="dummy",
                    device="cpu") as dep:
        assert dep.devices.devices == {0: "cpu", 1: "cpu"}
    with pytest.raises(ConfigError, match="devices.0: cuda:0 does not exist"):
        mstar.load("testvla", preset="tiny", load_format="dummy", device="cuda:0")
