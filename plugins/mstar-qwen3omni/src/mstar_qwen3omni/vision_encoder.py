"""Qwen3-Omni's vision encoder: image or video patches -> Thinker-width embeddings plus the
deepstack features the Thinker adds to its first layers, as `transformers`'
`Qwen3OmniMoeVisionEncoder` computes them.

Input rows are the processor's patches (`processing.py`): C·T·P·P values each, in
spatial-merge-block order (every run of merge² rows is one merged token), frame after frame.
The 3-D patch embedding is a stride-equal Conv3d, so it runs as one matmul over the rows. A
learned square position table is resampled bilinearly (align_corners) to each grid and added;
attention gets 2-D rotary positions (row, column) and runs per frame (HF's cu_seqlens of
h·w per temporal step), ragged across items (`ragged_attention`). The patch merger (norm,
merge², MLP) gives the embeddings; after each block in `deepstack_visual_indexes`, a merger
that normalises after the merge gives one deepstack feature.

Parameter names are the module's (`patch_embed.proj`, `pos_embed`, `blocks.N.{norm1, norm2,
attn.{qkv, proj}, mlp.linear_fc{1,2}}`, `merger.{ln_q, mlp.0, mlp.2}`, `merger_list.K.*`),
under `thinker.visual.` in the checkpoint (`vision_weight_spec`), except that both MLPs are
core's `MLP` (`fc1`, `fc2`): the spec renames.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.forward import Segment, StepContext
from mstar.model.layers.attention import PagedAttention
from mstar.model.layers.mlp import ACTIVATIONS
from mstar.model.layers.rotary import RotaryEmbedding
from mstar.model.layers.vision import MLP
from mstar.model.ragged import ragged_attention
from mstar.weights import WeightSpec

CHECKPOINT_PREFIX = "thinker.visual."


@dataclass(frozen=True)
class VisionEncoderConfig:
    """Fields of HF's `Qwen3OmniMoeVisionEncoderConfig` (its defaults, except
    `out_hidden_size`: the Thinker's width, 2048 in Qwen3-Omni-30B-A3B). The axial rotary's
    base is `rope_parameters["rope_theta"]` (10000 when absent)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 2048
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_parameters: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "deepstack_visual_indexes",
                           tuple(self.deepstack_visual_indexes))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / num_heads {self.num_heads} "
                             "must give a head size that is a multiple of 4 (2-D rotary)")
        if round(self.num_position_embeddings ** 0.5) ** 2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings={self.num_position_embeddings} is not "
                             "a square")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} must "
                             f"be blocks of 0..{self.depth - 1}")

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @property
    def patch_dim(self) -> int:
        """Values of one input row: C·T·P·P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size ** 2


class PatchEmbed(nn.Module):
    """The Conv3d with stride = kernel as a matmul over flattened (C, T, P, P) rows; the
    weight keeps its checkpoint shape [hidden, C, T, P, P]."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size,
                              (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size),
                              stride=(cfg.temporal_patch_size, cfg.patch_size,
                                      cfg.patch_size))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(rows, self.proj.weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    """Fused-qkv self-attention with 2-D rotary on q and k."""

    def __init__(self, cfg: VisionEncoderConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn = PagedAttention(layer_idx, self.num_heads, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        q, k = RotaryEmbedding.apply(q, k, cos_sin)
        return self.proj(self.attn(q, k, v).flatten(1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionEncoderConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos_sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge² neighbouring rows -> one token of `out_hidden_size`: LayerNorm per row before
    the merge (the final merger) or over the merged row (`postshuffle`, the deepstack
    mergers), then Linear, exact GELU, Linear."""

    def __init__(self, cfg: VisionEncoderConfig, *, postshuffle: bool):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.merge_unit
        self.postshuffle = postshuffle
        self.ln_q = nn.LayerNorm(self.merged if postshuffle else cfg.hidden_size, eps=1e-6)
        self.mlp = MLP(self.merged, self.merged, cfg.out_hidden_size, act="gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle:
            return self.mlp(self.ln_q(x.reshape(-1, self.merged)))
        return self.mlp(self.ln_q(x).reshape(-1, self.merged))


def merge_block_order(h: int, w: int, merge: int) -> torch.Tensor:
    """Raster index (row·w + col) of each patch in spatial-merge-block order: blocks of
    merge×merge patches row-major, each block's patches row-major."""
    index = torch.arange(h * w).view(h // merge, merge, w // merge, merge)
    return index.permute(0, 2, 1, 3).flatten()


class VisionEncoder(nn.Module):
    """Several images / videos (`grid_thw` each) -> per item (embeddings [patches/merge²,
    out_hidden_size], deepstack [len(deepstack_visual_indexes), patches/merge²,
    out_hidden_size]), in one ragged pass."""

    def __init__(self, cfg: VisionEncoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {cfg.hidden_act!r}")
        self.side = round(cfg.num_position_embeddings ** 0.5)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg, i) for i in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def _check(self, rows: torch.Tensor, grid: tuple[int, int, int]) -> None:
        t, h, w = grid
        m = self.cfg.spatial_merge_size
        if min(grid) < 1 or h % m or w % m:
            raise ValueError(f"grid_thw {list(grid)} must be positive with h and w "
                             f"multiples of spatial_merge_size={m}")
        if tuple(rows.shape) != (t * h * w, self.cfg.patch_dim):
            raise ValueError(f"pixel_values {tuple(rows.shape)} do not match grid_thw "
                             f"{list(grid)}: want [{t * h * w}, {self.cfg.patch_dim}]")

    def _positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """The learned table resampled to the h×w grid (bilinear, align_corners: corners on
        corners), in merge-block order, repeated for every temporal step: [t·h·w, hidden]."""
        t, h, w = grid
        side, weight = self.side, self.pos_embed.weight

        def taps(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
            lo = src.floor()
            return lo.long(), (lo.long() + 1).clamp(max=side - 1), src - lo

        h0, h1, dh = taps(h)
        w0, w1, dw = taps(w)
        table = weight.view(side, side, -1)
        dh, dw = dh.to(weight)[:, None, None], dw.to(weight)[None, :, None]
        grid_emb = (table[h0][:, w0] * (1 - dh) * (1 - dw) + table[h0][:, w1] * (1 - dh) * dw
                    + table[h1][:, w0] * dh * (1 - dw) + table[h1][:, w1] * dh * dw)
        order = merge_block_order(h, w, self.cfg.spatial_merge_size).to(weight.device)
        return grid_emb.reshape(h * w, -1)[order].repeat(t, 1)

    def _rotary(self, grids: Sequence[tuple[int, int, int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim]: the first quarter of the head's frequencies turn with
        the patch's row, the second with its column (same frequencies, base `rope_theta`
        over head_dim/2), then repeated for the rotate-half pairs."""
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2)
        inv_freq = 1.0 / self.cfg.rope_theta ** quarter
        pos = []
        for t, h, w in grids:
            order = merge_block_order(h, w, self.cfg.spatial_merge_size)
            pos.append(torch.stack([order // w, order % w], dim=1).repeat(t, 1))
        rows_cols = torch.cat(pos).float()
        angles = torch.cat([rows_cols[:, :1] * inv_freq, rows_cols[:, 1:] * inv_freq], dim=1)
        emb = torch.cat([angles, angles], dim=1)[:, None, :].to(device)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: Sequence[torch.Tensor],
                grids: Sequence[tuple[int, int, int]]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        for rows, grid in zip(pixel_values, grids, strict=True):
            self._check(rows, grid)
        dtype = self.pos_embed.weight.dtype
        x = self.patch_embed(torch.cat(list(pixel_values)).to(dtype))
        x = x + torch.cat([self._positions(g) for g in grids])
        cos_sin = self._rotary(grids, x.device)
        frames = [[Segment(h * w, "bidirectional")] for t, h, w in grids for _ in range(t)]
        deepstack = []
        with ragged_attention(frames, device=x.device):
            for i, block in enumerate(self.blocks):
                x = block(x, cos_sin)
                if i in self.cfg.deepstack_visual_indexes:
                    merger = self.merger_list[self.cfg.deepstack_visual_indexes.index(i)]
                    deepstack.append(merger(x))
        tokens = [t * h * w // self.cfg.merge_unit for t, h, w in grids]
        embeds = self.merger(x).split(tokens)
        width = self.cfg.out_hidden_size
        stacked = (torch.stack(deepstack) if deepstack
                   else x.new_zeros(0, sum(tokens), width)).split(tokens, dim=1)
        return list(zip(embeds, stacked, strict=True))


class VisionEncoderNode(VisionEncoder):
    """The `vision_encoder` node: each item's `pixel_values` [patches, C·T·P·P] and
    `grid_thw` [3] -> `vision_embeds` [patches/merge², out_hidden_size] and `deepstack`
    [k, patches/merge², out_hidden_size]; every item in one pass."""

    def forward(self, items: list[dict[str, Any]],  # type: ignore[override]
                ctx: StepContext | None = None) -> list[dict[str, Any]]:
        if not items:
            return []
        grids = [tuple(int(v) for v in item["grid_thw"].reshape(3).tolist())
                 for item in items]
        outs = super().forward([item["pixel_values"] for item in items], grids)  # type: ignore[arg-type]
        return [{"vision_embeds": e, "deepstack": d} for e, d in outs]


def vision_weight_spec(source: str = "default") -> WeightSpec:
    """The encoder's tensors in the hub checkpoint (`thinker.visual.*`), the MLPs renamed
    to core's `MLP` (`linear_fc1`/`mlp.0` -> `fc1`, `linear_fc2`/`mlp.2` -> `fc2`); every
    other key of the checkpoint is ignored."""
    prefix = CHECKPOINT_PREFIX.replace(".", r"\.")
    return WeightSpec(source=source, key_map=(
        (prefix + r"(blocks\.\d+\.mlp)\.linear_fc(\d)\.(weight|bias)", r"\1.fc\2.\3"),
        (prefix + r"(.*merger.*\.mlp)\.0\.(weight|bias)", r"\1.fc1.\2"),
        (prefix + r"(.*merger.*\.mlp)\.2\.(weight|bias)", r"\1.fc2.\2"),
        (prefix + r"(.*)", r"\1"),
        (r".*", None)))


__all__ = ["VisionEncoder", "VisionEncoderConfig", "VisionEncoderNode", "merge_block_order",
           "vision_weight_spec"]
