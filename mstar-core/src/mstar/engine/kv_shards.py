"""A tensor-parallel node's K/V across its group: every rank holds whole KV heads, rank i
of the group (leader first) heads [i*h, (i+1)*h), as the column-parallel K/V projections
split them. A sequence leaving the group (a migration, a fork into a branch elsewhere)
leaves whole: the leader gathers every shard (`gather_heads`). One arriving is split over
the destination's ranks (`split_heads`, the leader keeps its own and `scatter_heads` the
rest). So the groups on either side may differ in tp_size: what travels between them is
always the whole K/V, `[num_layers, 2, length, num_kv_heads, head_dim]`.

Why collectives in the group and not one transfer per rank: the ranks already run the
node's forward in lock step through the same process group (the leader sends an operation,
its followers join the collective when they handle it, in order), a follower needs no
address outside its group, and the destination need not know the source's layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

#: The head axis of an exported sequence's K/V `[num_layers, 2, length, KVH, D]`.
HEADS = 3


def split_heads(kv: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """Whole K/V as `tp_size` contiguous shards of its heads, in group order."""
    if kv.shape[HEADS] % tp_size:
        raise ValueError(f"{kv.shape[HEADS]} KV heads do not split over {tp_size} ranks")
    return [s.contiguous() for s in kv.chunk(tp_size, dim=HEADS)]


def gather_heads(local: torch.Tensor, group: Any, tp_size: int) -> torch.Tensor:
    """Every rank's shard concatenated along the heads (every rank of `group` calls it)."""
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(tp_size)]
    dist.all_gather(parts, local, group=group)
    return torch.cat(parts, dim=HEADS)


def scatter_heads(shards: list[torch.Tensor] | None, like: torch.Tensor,
                  group: Any) -> torch.Tensor:
    """The leader's `shards` (None on a follower) to the ranks of `group`: each gets its
    own into a tensor shaped as `like`."""
    out = torch.empty_like(like)
    dist.scatter(out, shards, src=dist.get_global_rank(group, 0), group=group)
    return out
