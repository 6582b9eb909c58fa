"""Tensor-parallel plumbing shared by the TP layers: shard markers and the two collectives.

A sharded parameter carries `tp_shard_dim` (the dimension split across ranks, or None when
replicated) and `tp_full_size` (that dimension's unsharded size). The weight loader and the
dummy initialiser read only these two attributes, so a new TP layer needs nothing else.

The collectives refuse to run at `tp_size > 1` without an explicit group: a layer built for
one rank of a TP group must never quietly compute a partial result. A caller that wants one
rank's part (tests, or code that reduces by other means) calls the layer's `local_forward`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def mark_sharded(param: nn.Parameter, dim: int | None, full_size: int | None = None) -> None:
    """Record how `param` is split across TP ranks (dim None: replicated on every rank)."""
    param.tp_shard_dim = dim
    param.tp_full_size = full_size if dim is not None else None


def shard_size(full_size: int, tp_size: int) -> int:
    """Rows per rank when `full_size` rows are split over `tp_size` ranks (last one padded)."""
    return -(-full_size // tp_size)


def check_tp(tp_rank: int, tp_size: int) -> None:
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"invalid tensor-parallel position tp_rank={tp_rank}, tp_size={tp_size}")


def _require_group(tp_size: int, group: Any, op: str) -> None:
    if group is None:
        raise RuntimeError(
            f"{op} across tp_size={tp_size} ranks needs a tp_group (a torch.distributed process "
            "group; pass torch.distributed.group.WORLD when the group is every rank). To compute "
            "one rank's part without a collective, call the layer's local_forward().")


def all_reduce(x: torch.Tensor, tp_size: int, group: Any) -> torch.Tensor:
    """Sum `x` over the TP group in place (a no-op at tp_size 1)."""
    if tp_size == 1:
        return x
    _require_group(tp_size, group, "all_reduce")
    dist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, tp_size: int, group: Any) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension, in rank order."""
    if tp_size == 1:
        return x
    _require_group(tp_size, group, "all_gather")
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)
