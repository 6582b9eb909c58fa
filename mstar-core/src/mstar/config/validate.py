"""Check a deployment config against its model, and resolve where every node runs.

Placement is config-only, so a bad placement must fail before any process starts, with
every problem at once: one message per bad field, naming it (`node_groups.1.tp_size`) and
what is allowed. The resolved `Placement` is what the conductor and workers read; nothing
else interprets `node_groups`.

Placement rules. A node group places its nodes on its ranks for its `graph_walks` (all
walks when omitted). Each (walk, node) that a walk runs must be placed exactly once. A
branch node (`GraphNode(alias_of=...)`) may be placed by its own name; otherwise it runs
where its target runs in that walk. With no node groups at all everything runs on rank 0.
A rank holds one copy of a node's weights, so all placements of a node on one rank must
agree on tensor-parallel ranks and dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mstar.config.deployment import DeploymentConfig, NodeGroup
from mstar.graph.primitives import walk_nodes

if TYPE_CHECKING:
    from mstar.model.contract import Model

#: dtype names a node group may ask for.
DTYPES = ("float32", "float16", "bfloat16")


class ConfigError(ValueError):
    """A config that cannot run; `problems` holds one message per bad field."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        where = f" {source}" if source else ""
        head = f"invalid config{where}: {len(self.problems)} problem(s)"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


@dataclass(frozen=True)
class NodePlacement:
    """Where a node runs for one walk: its `ranks` (a tensor-parallel group when
    `tp_size` > 1), its dtype (None: the model's policy) and `module`, the node whose
    weights run it (a branch node's target, else the node itself)."""

    module: str
    ranks: tuple[int, ...]
    tp_size: int = 1
    dtype: str | None = None


@dataclass(frozen=True)
class Placement:
    """The resolved placement: (walk, node) -> `NodePlacement` for every node each walk
    runs, branch nodes included under their own names."""

    nodes: Mapping[tuple[str, str], NodePlacement]

    def get(self, walk: str, node: str) -> NodePlacement:
        try:
            return self.nodes[(walk, node)]
        except KeyError:
            raise KeyError(f"walk {walk!r} does not run node {node!r}") from None

    def ranks(self) -> list[int]:
        return sorted({rank for p in self.nodes.values() for rank in p.ranks})

    def nodes_on(self, rank: int) -> dict[str, NodePlacement]:
        """The nodes whose weights `rank` holds (modules, not branch names), each with its
        placement: what the rank's worker builds and how it shards it."""
        return {p.module: p for p in self.nodes.values() if rank in p.ranks}


@dataclass(frozen=True)
class _ModelView:
    """What validation needs from a model, computed once."""

    engines: dict[str, str]
    tp_nodes: set[str]
    branches: dict[str, str]  # branch node -> target
    walk_runs: dict[str, list[str]]  # walk -> node names it runs (branches included)

    @classmethod
    def of(cls, model: Model) -> _ModelView:
        branches: dict[str, str] = {}
        walk_runs: dict[str, list[str]] = {}
        for walk_name, walk in model.graph_walks().items():
            runs = walk_runs[walk_name] = []
            for node in walk_nodes(walk):
                if node.alias_of is not None:
                    branches[node.name] = node.alias_of
                if node.name not in runs:
                    runs.append(node.name)
        return cls(dict(model.node_engine_types()), set(model.tp_nodes()), branches, walk_runs)

    def covers(self, walk: str, node: str) -> bool:
        """Whether placing `node` for `walk` means anything: the walk runs it, or runs a
        branch of it (a branch not placed by name follows its target)."""
        return any(n == node or self.branches.get(n) == node for n in self.walk_runs[walk])


def _join(names: object) -> str:
    return ", ".join(sorted(str(n) for n in names)) or "none"


def _group_problems(index: int, group: NodeGroup, model: Model, view: _ModelView) -> list[str]:
    """Problems of one node group on its own: names, ranks, tp_size, dtype."""
    at = f"node_groups.{index}"
    problems = []
    known_nodes = set(view.engines) | set(view.branches)
    for i, node in enumerate(group.node_names):
        if node not in known_nodes:
            problems.append(f"{at}.node_names.{i}: unknown node {node!r}; allowed: "
                            f"{_join(known_nodes)}")
    for i, walk in enumerate(group.graph_walks or ()):
        if walk not in view.walk_runs:
            problems.append(f"{at}.graph_walks.{i}: unknown walk {walk!r}; allowed: "
                            f"{_join(view.walk_runs)}")
    for i, rank in enumerate(group.ranks):
        if rank < 0:
            problems.append(f"{at}.ranks.{i}: rank {rank} is negative; ranks are 0, 1, ...")
        elif rank in group.ranks[:i]:
            problems.append(f"{at}.ranks.{i}: rank {rank} is listed twice")
    if group.tp_size != len(group.ranks):
        problems.append(f"{at}.tp_size: {group.tp_size} with {len(group.ranks)} rank(s); "
                        f"tp_size must equal the number of ranks ({len(group.ranks)})")
    if group.tp_size > 1:
        for node in group.node_names:
            module = view.branches.get(node, node)
            if module not in view.engines:
                continue
            if module not in view.tp_nodes:
                problems.append(f"{at}.tp_size: node {node!r} cannot be sharded "
                                f"(tp_size {group.tp_size}); nodes allowing tp_size > 1: "
                                f"{_join(view.tp_nodes)}")
            elif view.engines[module] == "kv_cache":
                spec = model.kv_spec(module)
                heads, kv_heads = spec.query_heads, spec.num_kv_heads
                if heads % group.tp_size or kv_heads % group.tp_size:
                    both = math.gcd(heads, kv_heads)
                    allowed = [d for d in range(1, both + 1) if both % d == 0]
                    problems.append(f"{at}.tp_size: {group.tp_size} does not divide node "
                                    f"{node!r}'s {heads} query heads and {kv_heads} KV "
                                    f"heads (each rank holds whole heads of both); allowed: "
                                    f"{_join(allowed)}")
    if group.dtype is not None and group.dtype not in DTYPES:
        problems.append(f"{at}.dtype: unknown dtype {group.dtype!r}; allowed: "
                        f"{', '.join(DTYPES)}")
    return problems


def _config_problems(config: DeploymentConfig, model: Model, view: _ModelView) -> list[str]:
    """Problems outside node groups: model_kwargs, KV-cache shares and size."""
    problems = []
    config_class = type(model).config_class
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in config.model_kwargs:
        if key not in fields:
            problems.append(f"model_kwargs.{key}: not a field of {config_class.__name__}; "
                            f"allowed: {_join(fields)}")
    kv_nodes = {n for n, engine in view.engines.items() if engine == "kv_cache"}
    for node in config.kv_cache.shares or {}:
        if node not in kv_nodes:
            problems.append(f"kv_cache.shares.{node}: not a KV-cache node; allowed: "
                            f"{_join(kv_nodes)}")
    kv = config.kv_cache
    need = -(-config.max_seq_len // kv.page_size)
    if kv_nodes and kv.num_pages is not None and kv.num_pages < need:
        problems.append(f"kv_cache.num_pages: {kv.num_pages} pages of {kv.page_size} tokens "
                        f"hold {kv.num_pages * kv.page_size} tokens, less than one sequence of "
                        f"max_seq_len={config.max_seq_len} ({need} pages); raise "
                        f"kv_cache.num_pages to at least {need} or lower max_seq_len")
    return problems


def _resolve(config: DeploymentConfig, model: Model,
             view: _ModelView) -> tuple[list[str], dict[tuple[str, str], NodePlacement]]:
    """Assign every (walk, node) its group: (problems, placements)."""
    groups = config.node_groups or [NodeGroup(node_names=list(view.engines), ranks=[0])]
    covering: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        for node in group.node_names:
            for walk in group.graph_walks or view.walk_runs:
                if walk in view.walk_runs and view.covers(walk, node):
                    covering[(walk, node)].append(index)

    problems = []
    twice: dict[tuple[str, tuple[int, ...]], list[str]] = defaultdict(list)
    for (walk, node), indices in covering.items():
        if len(indices) > 1:
            twice[(node, tuple(indices))].append(walk)
    for (node, indices), walks in twice.items():
        problems.append(f"node_groups.{indices[-1]}.graph_walks: node {node!r} is placed "
                        f"again for walk(s) {_join(walks)} (already by node_groups."
                        f"{indices[0]}); allowed: walks no other group places it for")

    placed: dict[tuple[str, str], NodePlacement] = {}
    nowhere: dict[str, list[str]] = defaultdict(list)
    for walk, runs in view.walk_runs.items():
        for node in runs:
            target = view.branches.get(node)
            indices = covering.get((walk, node)) or covering.get((walk, target or node))
            if not indices:
                if not (target and target in runs):  # else reported for its target
                    nowhere[node].append(walk)
                continue
            group = groups[indices[0]]
            placed[(walk, node)] = NodePlacement(target or node, tuple(group.ranks),
                                                 group.tp_size, group.dtype)
    for node, walks in nowhere.items():
        problems.append(f"node_groups: node {node!r} is placed nowhere for walk(s) "
                        f"{_join(walks)}; add it to a node group for those walks")

    on_rank: dict[tuple[str, int], set[tuple[tuple[int, ...], str | None]]] = defaultdict(set)
    for p in placed.values():
        for rank in p.ranks:
            on_rank[(p.module, rank)].add((p.ranks if p.tp_size > 1 else (rank,), p.dtype))
    for (module, rank), layouts in sorted(on_rank.items()):
        if len(layouts) > 1:
            described = "; ".join(f"tp ranks {list(r)}, dtype {d or 'default'}"
                                  for r, d in sorted(layouts, key=str))
            problems.append(f"node_groups: node {module!r} on rank {rank} is placed with "
                            f"different layouts ({described}); a rank holds one copy of a "
                            f"node's weights, so its placements there must agree")
    return problems, placed


def _check(config: DeploymentConfig, model: Model) -> dict[tuple[str, str], NodePlacement]:
    view = _ModelView.of(model)
    problems = [p for i, g in enumerate(config.node_groups)
                for p in _group_problems(i, g, model, view)]
    problems += _config_problems(config, model, view)
    used = {r for g in config.node_groups for r in g.ranks if r >= 0}
    missing = sorted(set(range(max(used, default=-1) + 1)) - used)
    if missing:
        problems.append(f"node_groups.*.ranks: ranks must be numbered 0..{max(used)} without "
                        f"gaps; unused: {_join(missing)}")
    from mstar.config.devices import mapping_problems  # it imports this module

    problems += mapping_problems(config.devices, sorted(used) or [0])
    resolve_problems, placed = _resolve(config, model, view)
    problems += resolve_problems
    if problems:
        raise ConfigError(problems, source=f"for model {config.model!r}")
    return placed


def validate_for_model(config: DeploymentConfig, model: Model) -> None:
    """Raise `ConfigError` listing every way `config` cannot run `model`."""
    _check(config, model)


def placement(config: DeploymentConfig, model: Model) -> Placement:
    """The resolved placement of a valid config (raises `ConfigError` otherwise)."""
    return Placement(_check(config, model))
