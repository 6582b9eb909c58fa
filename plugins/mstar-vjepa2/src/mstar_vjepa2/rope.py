"""V-JEPA 2's 3D rotary position embedding, as the authors' checkpoints were trained with it.

The head dim is cut into three equal even slices, rotated by the token's frame (t), row
(h) and column (w) position; the dims left over (head_dim - 3·slice) are not rotated.
Within a slice, adjacent pairs (2i, 2i+1) rotate as (x, y) -> (x·cos - y·sin,
y·cos + x·sin), but the angles are the reference's: frequencies 10000^(-j/(d/2)) for
j < d/2, *tiled* across the slice ([f0 .. f(d/2-1), f0 .. f(d/2-1)]) rather than repeated per
pair, so the two members of a pair may turn by different angles (the authors keep this
quirk for compatibility with their weights). Core's `RotaryEmbedding` (half-split, one
position per token) cannot express either part.

The same rotation serves the encoder, the masked predictor and the action-conditioned
predictor: the AC predictor passes fractional h/w positions (snapped to its grid) and
rotates its action/state tokens by frame only (`height`/`width` None).
"""

from __future__ import annotations

import torch


def rope_slice_dim(head_dim: int) -> int:
    """Dims of each of the t, h and w slices: the largest even number <= head_dim / 3."""
    return 2 * ((head_dim // 3) // 2)


def rotate_pairs(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The reference's `rotate_queries_or_keys`: x `[..., d]`, `pos` broadcastable to
    `x.shape[:-1]` (e.g. `[N, 1]` for x `[N, heads, d]`)."""
    d = x.shape[-1]
    omega = torch.arange(d // 2, dtype=x.dtype, device=x.device) / (d / 2.0)
    omega = 1.0 / 10000**omega
    angle = pos.to(x.dtype)[..., None] * omega
    cos, sin = angle.cos().tile(2), angle.sin().tile(2)  # tiled, the quirk
    pairs = x.unflatten(-1, (-1, 2))
    turned = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + turned * sin


def rope_3d(x: torch.Tensor, frame: torch.Tensor, height: torch.Tensor | None = None,
            width: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate queries or keys x `[N, heads, head_dim]` by each token's frame, row and column
    position (`[N]` each, integer or fractional). A None position leaves its slice as is."""
    d = rope_slice_dim(x.shape[-1])
    parts = []
    for i, pos in enumerate((frame, height, width)):
        part = x[..., i * d:(i + 1) * d]
        parts.append(part if pos is None else rotate_pairs(part, pos[:, None]))
    parts.append(x[..., 3 * d:])
    return torch.cat(parts, dim=-1)


def grid_positions(ids: torch.Tensor, grid_h: int, grid_w: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frame, row, column) of token indices into a `[T', grid_h, grid_w]` patch grid in
    raster order (the order the tubelet convolution emits them)."""
    per_frame = grid_h * grid_w
    frame, rest = ids // per_frame, ids % per_frame
    return frame, rest // grid_w, rest % grid_w
