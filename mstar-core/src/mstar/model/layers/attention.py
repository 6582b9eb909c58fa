"""PagedAttention: the model-side handle of one attention layer.

It holds no cache and builds no mask: the backend set for this step by the engine (or by
an encoder's ragged helper) with `attention_context` owns both, so the same layer serves
paged decoding, chunked prefill, scratch chunks and cache-less encoder batches.
"""

from __future__ import annotations

import torch
from torch import nn

from mstar.model.forward import current_attention


def heads_per_rank(num_heads: int, num_kv_heads: int, tp_size: int) -> tuple[int, int]:
    """(query heads, KV heads) each of `tp_size` ranks holds: whole heads, so the KV heads
    must divide among the ranks (ValueError naming both otherwise)."""
    if num_kv_heads % tp_size or num_heads % tp_size:
        raise ValueError(f"num_attention_heads={num_heads} and num_key_value_heads="
                         f"{num_kv_heads} must be divisible by tp_size={tp_size}")
    return num_heads // tp_size, num_kv_heads // tp_size


class PagedAttention(nn.Module):
    """q [T, H, D], k/v [T, KVH, D] -> [T, H, D]; H and KVH are this rank's head counts."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return current_attention().attend(self.layer_idx, q, k, v, self.scale)

    def extra_repr(self) -> str:
        return (f"layer={self.layer_idx}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, scale={self.scale:.6g}")
