"""SigLIP-family vision transformers (SigLIP, PaliGemma's and BAGEL's towers) over ragged
batches: several images of different sizes packed back to back, no padding, each image
attending only to itself (`mstar.model.ragged`).

Parameter names are Hugging Face's `SiglipVisionModel` names (`embeddings.patch_embedding`,
`embeddings.position_embedding`, `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj,
layer_norm2, mlp.fc1, mlp.fc2}`, `post_layernorm`), so checkpoints load without renames.
Norms are plain `nn.LayerNorm`: nothing here needs more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.forward import Segment
from mstar.model.layers.attention import PagedAttention
from mstar.model.layers.embeddings import flattened_position_ids, patchify
from mstar.model.layers.mlp import ACTIVATIONS
from mstar.model.ragged import ragged_attention


@dataclass(frozen=True)
class SiglipConfig:
    """A SigLIP vision tower's sizes, under the field names of Hugging Face's
    `SiglipVisionConfig` (and of BAGEL's `vit_config.json`), with its defaults."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    @property
    def positions_per_side(self) -> int:
        """Side of the learned position table: `image_size // patch_size` cells."""
        return self.image_size // self.patch_size


class MLP(nn.Module):
    """fc2(act(fc1(x))), the two-layer MLP of ViT and encoder blocks (and of connectors,
    whose fc2 may change the width)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 *, act: str = "gelu_pytorch_tanh", bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; supported: {sorted(ACTIVATIONS)}")
        self.act_name, self.act = act, ACTIVATIONS[act]
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias,
                             dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def extra_repr(self) -> str:
        return f"act={self.act_name}"


class PatchEmbedding(nn.Module):
    """A patch-size-stride convolution applied to pre-cut patches as one matmul, so images
    of any size pack into one ragged batch: [N, p·p·C] rows of `patchify` ((row, col,
    channel) order) -> [N, dim].

    The weight keeps the shape its checkpoint stores: `[dim, C, p, p]`, a conv2d (Hugging
    Face SigLIP), or with `flat=True` `[dim, p·p·C]` already in row order (BAGEL converted
    its conv to a linear layer before training)."""

    def __init__(self, in_channels: int, dim: int, patch: int, *, flat: bool = False,
                 bias: bool = True, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_channels, self.dim, self.patch, self.flat = in_channels, dim, patch, flat
        shape = (dim, patch * patch * in_channels) if flat else (dim, in_channels, patch, patch)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype)) if bias else None
        nn.init.normal_(self.weight, std=(patch * patch * in_channels) ** -0.5)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.flat else self.weight.permute(0, 2, 3, 1).flatten(1)
        return F.linear(patches, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, dim={self.dim}, patch={self.patch}, "
                f"flat={self.flat}")


class SiglipAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections; which tokens attend to
    which is the attention context's (an encoder's ragged batch: within each image)."""

    def __init__(self, dim: int, num_heads: int, layer_idx: int = 0,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not a multiple of {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, dtype=dtype)
        self.k_proj = nn.Linear(dim, dim, dtype=dtype)
        self.v_proj = nn.Linear(dim, dim, dtype=dtype)
        self.out_proj = nn.Linear(dim, dim, dtype=dtype)
        self.attn = PagedAttention(layer_idx, num_heads, num_heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (proj(x).view(shape) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attn(q, k, v).flatten(1))


class SiglipEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: SiglipConfig, layer_idx: int = 0, dtype: torch.dtype | None = None):
        super().__init__()
        dim, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps, dtype=dtype)
        self.self_attn = SiglipAttention(dim, cfg.num_attention_heads, layer_idx, dtype)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps, dtype=dtype)
        self.mlp = MLP(dim, cfg.intermediate_size, act=cfg.hidden_act, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    """The layer stack over a packed batch [sum(lengths), dim]: item `i` is the next
    `lengths[i]` rows, attending bidirectionally within itself only."""

    def __init__(self, cfg: SiglipConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg, i, dtype)
                                    for i in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        with ragged_attention([[Segment(n, "bidirectional")] for n in lengths],
                              device=x.device):
            for layer in self.layers:
                x = layer(x)
        return x


class SiglipEmbeddings(nn.Module):
    """Patch embedding plus the learned position embedding of each patch's flattened id
    (`row * positions_per_side + col`)."""

    def __init__(self, cfg: SiglipConfig, *, flat_patch_weight: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.patch_embedding = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                              flat=flat_patch_weight, dtype=dtype)
        self.position_embedding = nn.Embedding(cfg.positions_per_side ** 2, cfg.hidden_size,
                                               dtype=dtype)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipVisionTransformer(nn.Module):
    """Embeddings, encoder and `post_layernorm` (Hugging Face's `vision_model`, without the
    pooling head) over a packed ragged batch of images."""

    def __init__(self, cfg: SiglipConfig, *, flat_patch_weight: bool = False,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg, flat_patch_weight=flat_patch_weight, dtype=dtype)
        self.encoder = SiglipEncoder(cfg, dtype)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor,
                lengths: Sequence[int]) -> torch.Tensor:
        """`pack_images`' output -> last hidden state [sum(lengths), hidden]."""
        x = self.embeddings(patches.to(self.post_layernorm.weight.dtype), position_ids)
        return self.post_layernorm(self.encoder(x, lengths))


def pack_images(images: Sequence[torch.Tensor], patch: int, side: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Images [C, H, W] (H, W multiples of `patch`) -> (patches [T, p·p·C], position ids
    [T] in a `side × side` table (each patch at its own row and column), patches per
    image). An image of `side·patch` pixels a side gets ids 0..side²-1 in row-major order,
    the ids Hugging Face SigLIP uses at its `image_size`."""
    rows = [patchify(image, patch) for image in images]
    ids = [flattened_position_ids(image.shape[1], image.shape[2], patch, side)
           for image in images]
    return torch.cat(rows), torch.cat(ids).to(rows[0].device), [r.shape[0] for r in rows]
