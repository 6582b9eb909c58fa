"""`DeploymentConfig`: one deployment's YAML (model, placement, engine sizes), used by the
in-process API and the server alike.

Placement lives here and only here: which ranks hold which nodes, per walk, with which
tensor-parallel size and dtype. `validate_for_model` checks it against the model's nodes,
walks and TP nodes before anything starts, giving one error per bad field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from mstar.model.contract import Model


class NodeGroup(BaseModel):
    """Place `node_names` on `ranks`, optionally only for `graph_walks`, sharded over
    `tp_size` ranks, in `dtype` (overrides the model's dtype policy for these nodes)."""

    model_config = ConfigDict(extra="forbid")

    node_names: list[str] = Field(min_length=1)
    ranks: list[int] = Field(min_length=1)
    graph_walks: list[str] | None = None
    tp_size: int = Field(default=1, ge=1)
    dtype: str | None = None


class NodeHosts(BaseModel):
    """One machine of a multi-node deployment (node k = the k-th entry of `nodes`): the
    address its processes listen on and peers reach, and the ranks it runs."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field(min_length=1)
    ranks: list[int] = Field(min_length=1)


class KVCacheConfig(BaseModel):
    """Cache capacity: an explicit `num_pages` per KV node pool (at least one `max_seq_len`
    sequence's), or `memory_fraction` of free memory divided among the ranks sharing the
    device (on CPU, the host's ranks), at most `scheduler.max_num_seqs` such sequences.
    `shares` splits a rank's pages between its KV nodes (default: proportional to each
    node's bytes per token x max_seq_len). `enable_prefix_caching`: reuse the cached pages
    of prompts that start the same way (off for tensor-parallel nodes)."""

    model_config = ConfigDict(extra="forbid")

    page_size: int = Field(default=16, ge=1)
    num_pages: int | None = Field(default=None, ge=1)
    memory_fraction: float = Field(default=0.3, gt=0, le=1)
    shares: dict[str, float] | None = None
    enable_prefix_caching: bool = True


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)


class DeploymentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_seq_len: int = Field(default=4096, ge=1)
    node_groups: list[NodeGroup] = Field(default_factory=list)
    #: The device of every rank (`{0: "cuda:0", 1: "cuda:0"}`; "cpu" or "cuda:<index>").
    #: None: rank r on cuda:r when CUDA is visible, else the CPU (`mstar.config.devices`).
    #: Two ranks mapped to one device share it (and split its KV budget).
    devices: dict[int, str] | None = None
    #: Multi-node: each node's host and ranks (`mstar.config.nodes`), or `ranks_per_node`
    #: (ranks [k*R, (k+1)*R) on node k; node 0 at `--master-addr`, node k at its `--host`
    #: or where it connects from). At most one of the two; neither: every rank on one node.
    nodes: list[NodeHosts] | None = None
    ranks_per_node: int | None = Field(default=None, ge=1)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent_requests: int = Field(default=256, ge=1)
    #: Children one walk step may run (`WalkStep.children`: `n` completions, CEM candidates;
    #: each holds KV and a lane): a step asking for more fails its request with a 400.
    max_children: int = Field(default=1024, ge=1)
    #: Bytes of outputs kept for reuse by each of the model's `cacheable_nodes` on each
    #: rank (an encoder-output cache keyed by the inputs' hash; 0: off).
    encoder_cache_bytes: int = Field(default=256 * 2**20, ge=0)
    request_timeout: float | None = Field(default=None, gt=0)
    #: Data-parallel copies of this layout behind one API server (`--data-parallel-size`):
    #: replica k runs it on the ranks shifted by k x (the highest rank + 1); the conductor
    #: sends each request to one replica (`mstar.runtime.routing`).
    replicas: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _one_node_map(self) -> DeploymentConfig:
        if self.nodes is not None and self.ranks_per_node is not None:
            raise ValueError("nodes and ranks_per_node both map ranks to nodes: set one")
        return self


def with_preset_cap(config: DeploymentConfig, model: Model, preset: str | None, *,
                    explicit: bool) -> DeploymentConfig:
    """`config` with `max_seq_len` at most the preset's cap (`Model.preset_max_seq_len`):
    a tiny preset served from a packaged YAML written for the real model does not take
    the real context length (and size its KV cache for it). A `max_seq_len` set
    `explicit`ly (`--set`, `mstar.load(max_seq_len=...)`) always wins."""
    cap = type(model).preset_max_seq_len.get(preset) if preset else None
    if explicit or cap is None or config.max_seq_len <= cap:
        return config
    return config.model_copy(update={"max_seq_len": cap})
