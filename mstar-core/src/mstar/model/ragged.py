"""The segment mask rule, and attention for cache-less ragged batches (encoders).

The rule every attention backend implements (the engine's over the KV cache, and this one):
a new token attends to all `context_len` tokens already cached for its sequence; among the
new tokens, a token of a causal segment attends up to and including itself, a token of a
bidirectional segment up to the end of its segment. An encoder's ragged batch (several
items of different lengths back to back, no padding, no cache) needs only that rule, so it
lives here, below the engine: `with ragged_attention([[Segment(n, "bidirectional")], ...]):`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mstar.model.forward import Segment, attention_context


def segment_mask(context_len: int, segments: list[Segment],
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask `[n, context_len + n]` (True: attend) of a chunk of `n` new tokens."""
    limits: list[int] = []
    pos = 0
    for seg in segments:
        end = pos + seg.length
        if seg.kind == "causal":
            limits.extend(range(pos + 1, end + 1))
        else:
            limits.extend([end] * seg.length)
        pos = end
    n = pos
    limit = torch.tensor(limits, dtype=torch.long, device=device)
    new = torch.arange(n, device=device)[None, :] < limit[:, None]
    ctx = torch.ones(n, context_len, dtype=torch.bool, device=device)
    return torch.cat([ctx, new], dim=1)


class RaggedAttention:
    """`AttentionBackend` of a cache-less ragged batch: item `i` is its own run of rows,
    attending only within itself by its segments."""

    def __init__(self, segment_lists: list[list[Segment]], *,
                 device: torch.device | str = "cpu") -> None:
        self._items: list[tuple[slice, torch.Tensor]] = []
        start = 0
        for segments in segment_lists:
            n = sum(seg.length for seg in segments)
            self._items.append((slice(start, start + n), segment_mask(0, segments, device)))
            start += n
        self.num_tokens = start

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, KVH, D]` -> `[T, H, D]`."""
        if q.shape[0] != self.num_tokens:
            raise ValueError(f"attention got {q.shape[0]} tokens, the batch has "
                             f"{self.num_tokens}")
        out = torch.empty_like(q)
        for rows, mask in self._items:
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                attn_mask=mask, scale=scale, enable_gqa=True)
            out[rows] = o.transpose(0, 1)
        return out


def ragged_attention(segment_lists: list[list[Segment]], *,
                     device: torch.device | str = "cpu") -> contextlib.AbstractContextManager:
    """Attention for a cache-less ragged batch (encoders): item `i` is its own run of rows
    with its own segments, attending only within itself, no padding.
    `with ragged_attention([[Segment(n1, "bidirectional")], ...]): encoder(x)`."""
    return attention_context(RaggedAttention(segment_lists, device=device))


__all__ = ["RaggedAttention", "ragged_attention", "segment_mask"]
