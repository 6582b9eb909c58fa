"""Which device each rank of a node runs on, in which dtype, over which TP backend.

Plain functions of the config, the placement and the number of visible CUDA devices
(injected, so every rule is tested on a machine without a GPU); `mstar.load` and the
served workers both call `device_plan`, so a rank lands on the same device either way.

Rules. Without a `devices` mapping in the YAML, rank r uses `cuda:r` when CUDA is
visible (an error when there are more ranks than visible devices), and every rank uses the
CPU when it is not (logged once). Across machines (the config's `nodes` or
`ranks_per_node`) each node numbers its own: its i-th rank uses its `cuda:i`, and a
mapping's devices are those of the rank's node. A `devices` mapping (`{0: "cuda:0", 1: "cuda:0"}`) names
the device of every rank and is the only way to put several ranks on one device: that is
the sharing rule, and those ranks split the device's KV budget. A mapping naming a device
that is not visible, or a tensor-parallel group spanning CPU and CUDA (or two of its ranks
on one CUDA device, which NCCL refuses) is an error at start, naming `devices`.
With data-parallel `replicas`, every rule applies to the global ranks (rank r on `cuda:r`);
a mapping names one replica's ranks and each further replica takes the next GPUs
(`replica_devices`), or it names every replica's ranks.

Importing this module imports no torch (`visible_cuda_devices` imports it when called).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from mstar.config.deployment import DeploymentConfig
from mstar.config.validate import ConfigError, Placement

log = logging.getLogger(__name__)

#: What a `devices` entry may name.
DEVICE_PATTERN = re.compile(r"cpu|cuda:(\d+)")

_cpu_logged = False


def visible_cuda_devices() -> int:
    """CUDA devices this process sees (0 without CUDA); honours CUDA_VISIBLE_DEVICES."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_kind(device: str) -> str:
    """"cuda" or "cpu"."""
    return device.split(":", 1)[0]


def default_dtype(device: str) -> str:
    """The dtype of a node whose group sets none: bfloat16 on CUDA, float32 on CPU."""
    return "bfloat16" if device_kind(device) == "cuda" else "float32"


def node_dtype(configured: str | None, device: str) -> str:
    """A node group's `dtype` when it sets one, else `default_dtype(device)`."""
    return configured or default_dtype(device)


def tp_backend(device: str) -> str:
    """The torch.distributed backend of a tensor-parallel group on `device`'s kind."""
    return "nccl" if device_kind(device) == "cuda" else "gloo"


def mapping_problems(mapping: dict[int, str] | None, ranks: list[int]) -> list[str]:
    """The machine-independent problems of a `devices` mapping (part of config validation):
    every rank mapped, no unknown rank, each device spelled `cpu` or `cuda:<index>`."""
    if mapping is None:
        return []
    problems = []
    for rank, device in sorted(mapping.items()):
        if rank not in ranks:
            problems.append(f"devices.{rank}: no node group uses rank {rank}; ranks: "
                            f"{', '.join(map(str, ranks))}")
        if not DEVICE_PATTERN.fullmatch(device):
            problems.append(f"devices.{rank}: {device!r} is not a device; allowed: 'cpu' or "
                            "'cuda:<index>' (e.g. 'cuda:0')")
    missing = [r for r in ranks if r not in mapping]
    if missing:
        problems.append(f"devices: rank(s) {', '.join(map(str, missing))} have no device; "
                        "a devices mapping names the device of every rank")
    return problems


def mapped_ranks(mapping: dict[int, str] | None, base: list[int], replicas: int) -> list[int]:
    """The ranks a `devices` mapping must name: one replica's (`base`, the config's own
    ranks; `replica_devices` gives the other replicas theirs), or every replica's ranks
    when it names any rank beyond them (then it is taken as written)."""
    if mapping is None or replicas == 1 or set(mapping) <= set(base):
        return base
    per = max(base) + 1
    return [r + k * per for k in range(replicas) for r in base]


def replica_devices(mapping: dict[int, str], base: list[int], replicas: int
                    ) -> dict[int, str]:
    """A mapping of one replica's ranks (`base`: 0..R-1) extended to every replica: rank
    `r + k * R` of replica k takes the device of `r`, its CUDA index shifted by
    `k * D` (D: the highest CUDA index the mapping names, plus one), so each replica runs on
    GPUs of its own and shares them as replica 0 does; "cpu" stays the CPU. A mapping
    naming every replica's ranks is returned as it is."""
    if replicas == 1 or set(mapping) != set(base):
        return mapping
    index = {r: m.group(1) for r, d in mapping.items()
             if (m := DEVICE_PATTERN.fullmatch(d)) is not None}
    span = max((int(i) for i in index.values() if i is not None), default=-1) + 1
    per = max(base) + 1
    return {r + k * per: d if index.get(r) is None else f"cuda:{int(index[r]) + k * span}"
            for k in range(replicas) for r, d in mapping.items()}


@dataclass(frozen=True)
class DevicePlan:
    """The device of every rank (`"cpu"` or `"cuda:<index>"`) on its node, and each rank's
    node (`node_of`; all 0 on one machine): `cuda:0` of node 0 and of node 1 are two GPUs."""

    devices: dict[int, str]
    node_of: dict[int, int] | None = None

    def device(self, rank: int) -> str:
        return self.devices[rank]

    def _where(self, rank: int) -> tuple[int, str]:
        return (self.node_of or {}).get(rank, 0), self.devices[rank]

    def ranks_sharing(self, rank: int) -> int:
        """Ranks on `rank`'s device of its node, itself included: they split its KV budget."""
        return sum(self._where(r) == self._where(rank) for r in self.devices)


def rank_nodes(config: DeploymentConfig, ranks: list[int]) -> dict[int, int]:
    """The node (machine) of each rank by the config's `nodes` or `ranks_per_node` (all 0
    without them): each node numbers its own GPUs from cuda:0, as CUDA does."""
    if config.nodes is not None:
        return {r: k for k, node in enumerate(config.nodes) for r in node.ranks}
    per = config.ranks_per_node
    return {r: (r // per if per else 0) for r in ranks}


def _tp_groups(where: Placement) -> set[tuple[int, ...]]:
    return {p.ranks for rank in where.ranks() for p in where.nodes_on(rank).values()
            if p.tp_size > 1}


def device_plan(config: DeploymentConfig, where: Placement, *,
                cuda_devices: int | None = None) -> DevicePlan:
    """Every rank's device under the rules above. `cuda_devices`: the visible CUDA
    devices (default: counted now). Raises `ConfigError` naming `devices`."""
    count = visible_cuda_devices() if cuda_devices is None else cuda_devices
    ranks = where.ranks()
    node_of = rank_nodes(config, ranks)
    base = ranks[:where.ranks_per_replica]
    problems = mapping_problems(config.devices,
                                mapped_ranks(config.devices, base, where.replicas))
    if problems:
        raise ConfigError(problems)
    if config.devices is not None:
        mapping = replica_devices(config.devices, base, where.replicas)
        devices = {r: mapping[r] for r in ranks}
        for rank, device in sorted(devices.items()):
            index = DEVICE_PATTERN.fullmatch(device).group(1)  # type: ignore[union-attr]
            if index is not None and int(index) >= count:
                visible = (f"visible: cuda:0..cuda:{count - 1}" if count
                           else "no CUDA device is visible")
                problems.append(f"devices.{rank}: {device} does not exist; {visible}")
    elif count == 0:
        devices = dict.fromkeys(ranks, "cpu")
        global _cpu_logged
        if not _cpu_logged:
            _cpu_logged = True
            log.info("no CUDA device visible: every rank runs on the CPU")
    else:
        devices = {}
        for node in sorted(set(node_of.values())):  # rank r on cuda:r on one node
            local = [r for r in ranks if node_of.get(r, 0) == node]
            if len(local) > count:
                where_ = f" on node {node}" if len(set(node_of.values())) > 1 else ""
                raise ConfigError([
                    f"devices: {len(local)} ranks{where_} but {count} visible CUDA "
                    "device(s); make more devices visible (--gpus), or add a devices "
                    "mapping (e.g. {0: 'cuda:0', 1: 'cuda:0'}) to put several ranks on one "
                    "device"])
            devices.update({r: f"cuda:{i}" for i, r in enumerate(local)})
    for group in sorted(_tp_groups(where)):
        on = [devices[r] for r in group]
        spots = {(node_of.get(r, 0), devices[r]) for r in group}
        if len({device_kind(d) for d in on}) > 1:
            problems.append(f"devices: tensor-parallel group of ranks {list(group)} spans "
                            f"devices of different kinds ({', '.join(on)}); put the whole "
                            "group on CUDA or on the CPU")
        elif device_kind(on[0]) == "cuda" and len(spots) < len(on):
            problems.append(f"devices: tensor-parallel group of ranks {list(group)} puts two "
                            f"ranks on one CUDA device ({', '.join(on)}); NCCL needs one "
                            "device per rank")
    if problems:
        raise ConfigError(problems)
    return DevicePlan(devices, node_of)


def gpus_problem(gpus: str, visible: int) -> str | None:
    """Why `--gpus` cannot be honoured here, or None. `visible`: the CUDA devices torch sees
    once `CUDA_VISIBLE_DEVICES` is `gpus` (CUDA drops the first id it cannot find and every
    id after it). Asking for GPUs on a machine without CUDA, or for one that does not
    exist, is an error, not a silent run on the CPU or on fewer devices."""
    wanted = gpus.split(",")
    if visible == 0:
        return (f"--gpus {gpus}: no CUDA device is available on this machine (torch sees "
                f"none), or device {wanted[0]} does not exist; leave out --gpus to run on "
                "the CPU")
    if visible < len(wanted):
        return (f"--gpus {gpus}: device {wanted[visible]} does not exist (torch sees only "
                f"{', '.join(wanted[:visible])}); name devices this machine has")
    return None
