"""Which node (machine) runs which rank: the config's `nodes` or `ranks_per_node` against
`--nnodes`, checked before any process starts so that a layout that cannot run on the
nodes given is one error naming the field and the numbers, not a hang at start-up."""

from __future__ import annotations

from collections.abc import Sequence

from mstar.config.deployment import DeploymentConfig
from mstar.config.validate import ConfigError


def _span(ranks: Sequence[int]) -> str:
    return f"{len(ranks)} rank(s) ({', '.join(map(str, sorted(ranks)))})"


def node_ranks(config: DeploymentConfig, ranks: Sequence[int], nnodes: int) -> list[list[int]]:
    """The ranks of each of `nnodes` nodes (node k = index k), covering `ranks` (the
    placement's) exactly once. Raises `ConfigError` naming `nodes`, `ranks_per_node` or
    `--nnodes` with the numbers that do not fit."""
    ranks = sorted(set(ranks))
    if config.nodes is not None:
        if len(config.nodes) != nnodes:
            raise ConfigError([f"nodes: {len(config.nodes)} node(s) listed, but --nnodes is "
                               f"{nnodes}"])
        per_node = [sorted(set(n.ranks)) for n in config.nodes]
        problems = []
        seen: dict[int, int] = {}
        for k, on in enumerate(per_node):
            for rank in on:
                if rank in seen:
                    problems.append(f"nodes[{k}].ranks: rank {rank} is on node {seen[rank]} "
                                    "too")
                seen.setdefault(rank, k)
            extra = [r for r in on if r not in ranks]
            if extra:
                problems.append(f"nodes[{k}].ranks: {_span(extra)} that no node group "
                                f"uses (the placement's ranks: {_span(ranks)})")
        missing = [r for r in ranks if r not in seen]
        if missing:
            problems.append(f"nodes: {_span(missing)} of the placement on no node")
        if problems:
            raise ConfigError(problems)
        return per_node
    if config.ranks_per_node is not None:
        per = config.ranks_per_node
        needed = ranks[-1] // per + 1
        if needed > nnodes:
            raise ConfigError([f"ranks_per_node: {per} rank(s) per node on {nnodes} node(s) "
                               f"(--nnodes) hold ranks 0..{nnodes * per - 1}, but the "
                               f"placement uses {_span(ranks)}: it needs {needed} nodes"])
        per_node = [[r for r in ranks if r // per == k] for k in range(nnodes)]
        idle = [k for k, on in enumerate(per_node) if not on]
        if idle:
            raise ConfigError([f"ranks_per_node: node(s) {', '.join(map(str, idle))} of "
                               f"{nnodes} (--nnodes) would run no rank of {_span(ranks)}"])
        return per_node
    if nnodes > 1:
        raise ConfigError([f"--nnodes {nnodes}: the config maps no rank to a node; set "
                           "`nodes` (each node's host and ranks) or `ranks_per_node`"])
    return [list(ranks)]


def node_hosts(config: DeploymentConfig, nnodes: int, master_addr: str) -> list[str | None]:
    """Each node's address where the config names it (`nodes`), else node 0's is
    `--master-addr` and the others' are learned when they join (None)."""
    if config.nodes is not None:
        return [n.host for n in config.nodes]
    return [master_addr] + [None] * (nnodes - 1)
