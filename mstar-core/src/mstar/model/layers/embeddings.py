"""Fixed and learned embeddings of positions and times that diffusion and vision models share:
a 2-D sine-cosine position table (DiT/MAE style, stored in checkpoints as `pos_embed`), the
DiT timestep embedder, openpi's flow-time embedding, patchifying an image, and flattened patch position ids.

These follow the DiT/MAE conventions BAGEL and others were trained with, so the exact order
of sin/cos halves and of the two grid axes matters: see each docstring.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(positions), dim]: [sin, cos] of positions · 10000^(-k / (dim/2)), k < dim/2."""
    if dim % 2:
        raise ValueError(f"sine-cosine embedding dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angle = positions.reshape(-1).to(torch.float64)[:, None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_2d_table(dim: int, side: int) -> torch.Tensor:
    """[side², dim] float32: row `r * side + c` is the embedding of grid cell (row r, col c):
    the first dim/2 features encode the column c, the last dim/2 the row r (the MAE/DiT
    table, whose meshgrid puts the width coordinate first)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine table dim must be a multiple of 4, got {dim}")
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    return torch.cat([sincos_1d(cols, dim // 2), sincos_1d(rows, dim // 2)], dim=1).float()


class PositionTable(nn.Module):
    """A frozen 2-D sine-cosine table of `side × side` cells, looked up by flattened position
    id (`row * side + col`). Checkpoints store it as `pos_embed` (loaded, never trained)."""

    def __init__(self, side: int, dim: int):
        super().__init__()
        self.side, self.dim = side, dim
        self.pos_embed = nn.Parameter(sincos_2d_table(dim, side), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]

    def extra_repr(self) -> str:
        return f"side={self.side}, dim={self.dim}"


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0
                         ) -> torch.Tensor:
    """[N, dim] float32: [cos, sin] of t · max_period^(-k / (dim/2)) (DiT's order, cos first),
    zero-padded by one column when dim is odd. `t` may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t.reshape(-1).float()[:, None] * freqs
    emb = torch.cat([angle.cos(), angle.sin()], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def period_sincos(t: torch.Tensor, dim: int, min_period: float, max_period: float
                  ) -> torch.Tensor:
    """[N, dim] float32: [sin, cos] of 2π·t / period for dim/2 periods spaced geometrically
    from `min_period` to `max_period`, both ends included: openpi's flow-time embedding
    (Pi0, Pi0.5), whose period range, unlike DiT's frequencies, is set for t in [0, 1].
    Computed in float64, as openpi does, so the shortest periods keep their precision."""
    if dim % 2:
        raise ValueError(f"period sine-cosine embedding dim must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi) * t.reshape(-1).to(torch.float64)[:, None]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: MLP(SiLU) over `timestep_frequencies`. Keys `mlp.0.*` and
    `mlp.2.*` as in DiT-style checkpoints."""

    def __init__(self, hidden_size: int, frequency_size: int = 256,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size, dtype=dtype), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size, dtype=dtype))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)·(W/p), p·p·C], patches in row-major order and each patch's values
    ordered (row, col, channel). H and W must be multiples of `patch`."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch size {patch}")
    x = image.reshape(c, h // patch, patch, w // patch, patch).permute(1, 3, 2, 4, 0)
    return x.reshape(-1, patch * patch * c)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Inverse of `patchify`: [gh·gw, p·p·C] -> [C, gh·p, gw·p]."""
    gh, gw = grid
    c = patches.shape[-1] // (patch * patch)
    x = patches.reshape(gh, gw, patch, patch, c).permute(4, 0, 2, 1, 3)
    return x.reshape(c, gh * patch, gw * patch)


def flattened_position_ids(height: int, width: int, patch: int, side: int, *,
                           interpolate: bool = False) -> torch.Tensor:
    """Position ids (`row * side + col`) of the (height/patch)×(width/patch) patches of an
    image in a `side × side` position table. Extrapolate (default): patch (r, c) takes cell
    (r, c), so images up to side·patch per side fit. Interpolate: the patch grid is spread
    over the whole table (cell = the patch's fractional coordinate bucketed into `side`)."""
    gh, gw = height // patch, width // patch
    if interpolate:
        edges = torch.arange(1 / side, 1.0, 1 / side)
        rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / gh), edges, right=True)
        cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / gw), edges, right=True)
    else:
        if gh > side or gw > side:
            raise ValueError(f"a {gh}x{gw} patch grid does not fit the {side}x{side} "
                             f"position table")
        rows, cols = torch.arange(gh), torch.arange(gw)
    return (rows[:, None] * side + cols).flatten()
