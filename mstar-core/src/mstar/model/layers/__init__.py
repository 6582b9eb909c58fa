"""Layers shared by every model: tensor-parallel linear/embedding/LM head, RMSNorm, rotary
embedding, gated MLP, paged attention, and the position/time embeddings of diffusion and
vision models. All are plain layers at tp_size 1."""

from mstar.model.layers.attention import PagedAttention, heads_per_rank
from mstar.model.layers.embeddings import PositionTable, TimestepEmbedder
from mstar.model.layers.linear import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from mstar.model.layers.mlp import GatedMLP
from mstar.model.layers.norm import RMSNorm
from mstar.model.layers.rotary import RotaryEmbedding

__all__ = [
    "ColumnParallelLinear",
    "GatedMLP",
    "PagedAttention",
    "ParallelLMHead",
    "PositionTable",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "TimestepEmbedder",
    "VocabParallelEmbedding",
    "heads_per_rank",
]
