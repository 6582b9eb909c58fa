"""Layers shared by every model: tensor-parallel linear/embedding/LM head, RMSNorm, rotary
embedding, gated MLP, sparse mixture-of-experts MLP, paged attention, the position/time
embeddings of diffusion and vision models, and SigLIP-family vision towers. All are plain layers at tp_size 1."""

from mstar.model.layers.attention import PagedAttention, heads_per_rank
from mstar.model.layers.embeddings import PositionTable, TimestepEmbedder
from mstar.model.layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from mstar.model.layers.mlp import GatedMLP
from mstar.model.layers.moe import SparseMoE
from mstar.model.layers.norm import RMSNorm
from mstar.model.layers.rotary import RotaryEmbedding
from mstar.model.layers.vision import (
    MLP,
    PatchEmbedding,
    SiglipConfig,
    SiglipEncoder,
    SiglipVisionTransformer,
    pack_images,
)

__all__ = [
    "ColumnParallelLinear",
    "GatedMLP",
    "MLP",
    "PagedAttention",
    "ParallelLMHead",
    "PatchEmbedding",
    "PositionTable",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "SiglipConfig",
    "SiglipEncoder",
    "SiglipVisionTransformer",
    "SparseMoE",
    "TimestepEmbedder",
    "VocabParallelEmbedding",
    "heads_per_rank",
    "pack_images",
]
