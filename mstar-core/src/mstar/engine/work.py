"""What a worker hands an engine: one node invocation of one request, and its result."""

from __future__ import annotations

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
    for step logs and noise keys; `lane` is the worker's handle to route the result back.
    """

    request_id: str
    child: int
    node: GraphNode
    inputs: dict[str, Any]
    seed: int
    sampling: SamplingParams
    walk: str = ""
    iteration: int | None = None
    lane: Any = None
    arrival: int = 0


@dataclass
class WorkResult:
    work: NodeWork
    outputs: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = None


class KeyedStepContext:
    """`StepContext` for one engine step: noise and in-node sampling keyed per request."""

    def __init__(self, works: list[NodeWork]):
        self._works = works

    def randn(self, seq_index: int, shape: tuple[int, ...], site: str, *,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self._works[seq_index]
        return rng.randn(shape, seed=w.seed, child=w.child, site=site,
                         step=w.iteration or 0, dtype=dtype)

    def sample(self, seq_index: int, logits: torch.Tensor, site: str, step: int) -> torch.Tensor:
        """Row j of `logits` is its own draw, keyed by site "<site>/<j>"."""
        from mstar.engine.sampler import SampleRequest, sample

        w = self._works[seq_index]
        rows = [SampleRequest(params=w.sampling, seed=w.seed, child=w.child,
                              site=f"{site}/{j}", step=step, history=())
                for j in range(logits.shape[0])]
        return sample(logits, rows).token_ids
