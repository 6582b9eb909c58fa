"""V-JEPA 2's video encoder: a ViT over 3D tubelet patches with 3D RoPE, run over a ragged
batch of clips (several clips of different lengths back to back, no padding, each clip
attending only to itself).

Parameter names are those of Hugging Face `VJEPA2Model.encoder` (`embeddings.
patch_embeddings.proj`, `layer.N.{norm1, attention.{query,key,value,proj}, norm2,
mlp.fc1, mlp.fc2}`, `layernorm`), so hub checkpoints load by dropping the `encoder.`
prefix. `VJepa2Block` is shared with the masked predictor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mstar.model import Segment, StepContext, ragged_attention
from mstar.model.layers import MLP, PagedAttention
from mstar_vjepa2.config import VJepa2Config
from mstar_vjepa2.rope import grid_positions, rope_3d

Items = list[dict[str, Any]]

# Hub keys of `VJEPA2Model` (`encoder.*`, `predictor.*`), also under `vjepa2.` in
# `VJEPA2ForVideoClassification` checkpoints, whose pooler and classifier no node uses.
_HUB = r"(?:vjepa2\.)?"
_CLASSIFIER = (r"(?:pooler|classifier)\..*", None)

#: Per node, `WeightSpec.key_map` rules from hub checkpoint keys to parameter names.
WEIGHT_KEY_MAPS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "video_encoder": (
        (_HUB + r"encoder\.(.*)", r"\1"),
        (_HUB + r"predictor\..*", None),
        _CLASSIFIER,
    ),
}


class VJepa2Attention(nn.Module):
    """Multi-head self-attention with 3D RoPE on queries and keys; which rows attend to
    which is the attention context's."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn = PagedAttention(layer_idx, num_heads, num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, positions: tuple[torch.Tensor, ...]) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q = rope_3d(self.query(x).view(shape), *positions)
        k = rope_3d(self.key(x).view(shape), *positions)
        return self.proj(self.attn(q, k, self.value(x).view(shape)).flatten(1))


class VJepa2Block(nn.Module):
    """Pre-norm block: x + attention(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cfg: VJepa2Config,
                 layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attention = VJepa2Attention(dim, num_heads, cfg.qkv_bias, layer_idx)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), act=cfg.hidden_act)

    def forward(self, x: torch.Tensor, positions: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = x + self.attention(self.norm1(x), positions)
        return x + self.mlp(self.norm2(x))


class _PatchEmbeddings(nn.Module):
    def __init__(self, cfg: VJepa2Config):
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.hidden_size, kernel_size=kernel, stride=kernel)


class _Embeddings(nn.Module):
    def __init__(self, cfg: VJepa2Config):
        super().__init__()
        self.patch_embeddings = _PatchEmbeddings(cfg)


class VideoEncoder(nn.Module):
    """items[i]["pixel_values"] `[T, 3, H, W]` (preprocessed, T a multiple of tubelet_size,
    H and W of patch_size) -> {"latents": `[T/tubelet · H/p · W/p, hidden]`} in the tubelet
    convolution's raster order (frame, row, column). Positions follow each clip's own patch
    grid, as the authors' encoder does for non-square input (for crop-size input it is the
    hub model's grid)."""

    def __init__(self, cfg: VJepa2Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.layer = nn.ModuleList(
            VJepa2Block(cfg.hidden_size, cfg.num_attention_heads, cfg.mlp_ratio, cfg, i)
            for i in range(cfg.num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def _check(self, pixels: torch.Tensor) -> None:
        cfg = self.cfg
        if pixels.dim() != 4 or pixels.shape[1] != cfg.in_chans:
            raise ValueError(f"pixel_values must be [T, {cfg.in_chans}, H, W], got "
                             f"{list(pixels.shape)}")
        t, _, h, w = pixels.shape
        if t == 0 or t % cfg.tubelet_size or h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"pixel_values {list(pixels.shape)}: T must be a positive multiple "
                             f"of tubelet_size={cfg.tubelet_size}, H and W multiples of "
                             f"patch_size={cfg.patch_size}")

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        if not items:
            return []
        proj = self.embeddings.patch_embeddings.proj
        tokens, frames, rows, cols, lengths = [], [], [], [], []
        for item in items:
            pixels = item["pixel_values"]
            self._check(pixels)
            # [T, C, H, W] -> conv over [C, T, H, W] -> [T'·H'·W', hidden]
            grid = proj(pixels.to(proj.weight.dtype).transpose(0, 1)[None])[0]
            tokens.append(grid.flatten(1).transpose(0, 1))
            n = tokens[-1].shape[0]
            t, h, w = grid_positions(torch.arange(n, device=grid.device), *grid.shape[2:])
            frames.append(t)
            rows.append(h)
            cols.append(w)
            lengths.append(n)
        x = torch.cat(tokens)
        positions = (torch.cat(frames), torch.cat(rows), torch.cat(cols))
        with ragged_attention([[Segment(n, "bidirectional")] for n in lengths],
                              device=x.device):
            for block in self.layer:
                x = block(x, positions)
        x = self.layernorm(x)
        return [{"latents": latents} for latents in x.split(lengths)]
