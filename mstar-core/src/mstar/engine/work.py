"""What a worker hands an engine: one node invocation of one request, and its result."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mstar.engine import rng
from mstar.graph.primitives import GraphNode
from mstar.model.sampling import SamplingParams


@dataclass
class NodeWork:
    """One invocation of `node` for one request (`child` numbers its lanes).

    `inputs` holds the environment values the node reads; `walk` and `iteration` are kept
    for step logs and noise keys, with `outer` (the enclosing loops' iterations, outermost
    first) and `join_round` (the `Join` round, None outside joined walks); `lane` is the worker's handle to route the result back.
    `sampling` is the node's own sampling parameters; `site_sampling` the request's by site
    (`RequestPlan.sampling`), for `ctx.sample`; `site_history` the ids `ctx.sample` drew so
    far for this request and child, by keyed site (kept by the worker with the request).
    """

    request_id: str
    child: int
    node: GraphNode
    inputs: dict[str, Any]
    seed: int
    sampling: SamplingParams
    walk: str = ""
    iteration: int | None = None
    outer: tuple[int, ...] = ()
    join_round: int | None = None
    lane: Any = None
    arrival: int = 0
    site_sampling: Mapping[str, SamplingParams] = field(default_factory=dict)
    site_history: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class WorkResult:
    work: NodeWork
    outputs: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None


CPU = torch.device("cpu")


class KeyedStepContext:
    """`StepContext` for one engine step: noise and in-node sampling keyed per request.

    A KV sequence rebuilt after preemption runs without an invocation (its entry is None):
    it has no key to draw with, so a node must compute such rows from its recorded inputs
    (a rebuild has no outputs wanted: `SeqChunk.outputs` is empty). Noise is drawn on CPU
    (placement-independent) and lands on the engine's `device`, beside the node's tensors.

    `tp_group`: a tensor-parallel node's group. Its follower replays the step without the
    request's sampling parameters or history, so in-node draws are the leader's: each
    `sample` broadcasts the leader's ids (every rank of the group calls it at the same point
    of the forward), and the ranks feed the same ids on."""

    def __init__(self, works: list[NodeWork | None], device: torch.device = CPU,
                 tp_group: Any = None):
        self._works = works
        self.device = device  # as given: this runs once per engine step
        self.tp_group = tp_group

    def _work(self, seq_index: int) -> NodeWork:
        w = self._works[seq_index]
        if w is None:
            raise RuntimeError(f"sequence {seq_index} of this step is being rebuilt after "
                               "preemption: it has no invocation to key noise or sampling by")
        return w

    def randn(self, seq_index: int, shape: tuple[int, ...], site: str, *,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self._work(seq_index)
        return rng.randn(shape, seed=w.seed, child=w.child,
                         site=rng.noise_site(site, w.outer, w.join_round),
                         step=w.iteration or 0, dtype=dtype, device=self.device)

    def sample(self, seq_index: int, logits: torch.Tensor, site: str, step: int) -> torch.Tensor:
        """Row j of `logits` is its own draw, keyed by site "<site>/<j>", with the request's
        sampling parameters for `site` (`RequestPlan.sampling[site]`, else the node's own).
        Penalties and logits processors see the ids drawn before at that keyed site for this
        request and child; they are recorded only when the parameters use them (reading
        the ids back waits for the device)."""
        from mstar.engine.sampler import SampleRequest, sample

        w = self._work(seq_index)
        params = w.site_sampling.get(site) or w.sampling
        sites = [f"{site}/{j}" for j in range(logits.shape[0])]
        rows = [SampleRequest(params=params, seed=w.seed, child=w.child, site=key, step=step,
                              history=w.site_history.get(key, ())) for key in sites]
        token_ids = sample(logits, rows).token_ids
        if self.tp_group is not None:
            import torch.distributed as dist

            dist.broadcast(token_ids, src=dist.get_global_rank(self.tp_group, 0),
                           group=self.tp_group)
        if _uses_history(params):
            for key, token in zip(sites, token_ids.tolist()):
                w.site_history.setdefault(key, []).append(token)
        return token_ids


def _uses_history(params: SamplingParams) -> bool:
    return bool(params.repetition_penalty != 1.0 or params.frequency_penalty
                or params.presence_penalty or params.logits_processors)
