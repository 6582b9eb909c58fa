"""Orpheus' speech LM: a plain Llama-3 decoder built from core layers.

The fine-tune changes no architecture, only the vocabulary (Llama-3's 128,256 tokens plus
Orpheus' custom tokens, 156,940 in all), so this is Llama: RMSNorm, GQA attention with
Llama-3 rope scaling, SwiGLU MLP, an LM head tied to the embedding when the checkpoint says
so. Module names are the hub's (`model.layers.N.self_attn.q_proj`, ...), so the checkpoint's
keys load without renaming; every projection is a TP layer, so `tp_size > 1` shards it.

It is a KV-cache node: one ragged `ForwardBatch` per engine step in, `{"logits": ...}` out,
computed only on the rows the batch asks for (`batch.output_rows("logits")`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mstar.model import ForwardBatch, KVSpec
from mstar.model.layers import (
    ColumnParallelLinear,
    GatedMLP,
    PagedAttention,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    heads_per_rank,
)
from mstar.weights.spec import WeightSpec
from mstar_orpheus.config import OrpheusConfig

CosSin = tuple[torch.Tensor, torch.Tensor]


class _Attention(nn.Module):
    """`self_attn`: q/k/v column-parallel (each rank holds whole heads), o row-parallel."""

    def __init__(self, cfg: OrpheusConfig, layer_idx: int, tp: dict[str, Any]):
        super().__init__()
        self.heads, self.kv_heads = heads_per_rank(cfg.num_attention_heads,
                                                   cfg.num_key_value_heads, tp["tp_size"])
        self.head_dim = cfg.head_dim
        q_width = cfg.num_attention_heads * cfg.head_dim
        kv_width = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_width, **tp)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_width, **tp)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_width, **tp)
        self.o_proj = RowParallelLinear(q_width, cfg.hidden_size, **tp)
        self.attn = PagedAttention(layer_idx, self.heads, self.kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cos_sin: CosSin) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        q, k = rotary.apply(q, k, cos_sin)
        return self.o_proj(self.attn(q, k, v).reshape(n, self.heads * self.head_dim))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: OrpheusConfig, layer_idx: int, tp: dict[str, Any]):
        super().__init__()
        self.self_attn = _Attention(cfg, layer_idx, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act="silu", **tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, cos_sin: CosSin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _LlamaModel(nn.Module):
    """`model.*` of the checkpoint."""

    def __init__(self, cfg: OrpheusConfig, tp: dict[str, Any]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **tp)
        self.layers = nn.ModuleList(_DecoderLayer(cfg, i, tp)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class OrpheusLLM(nn.Module):
    """The KV-cache node of the speech LM: token ids [T] and positions [T] in, the
    `logits` [rows, vocab] of the rows the batch asks for out (the core sampler turns them
    into the next token: text-prompt continuation is audio codes)."""

    def __init__(self, config: OrpheusConfig, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Any = None):
        super().__init__()
        self.config = config
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        self.model = _LlamaModel(config, tp)
        tied = self.model.embed_tokens if config.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tied_to=tied, **tp)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta,
                                      rope_scaling=config.rope_scaling)

    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        x = self.model.embed_tokens(batch.input_ids)
        cos_sin = self.rotary.cos_sin(batch.positions)
        for layer in self.model.layers:
            x = layer(x, self.rotary, cos_sin)
        if not batch.wants("logits"):
            return {}
        rows = batch.output_rows("logits")
        return {"logits": self.lm_head(self.model.norm(x[rows]))}


def llm_weight_spec(config: OrpheusConfig | None = None) -> WeightSpec:
    """Hub keys are our parameter names, one to one. With tied embeddings the head IS the
    embedding, so an `lm_head.weight` some exports store anyway is ignored (loading it too
    would overwrite the embedding); rotary tables some Llama checkpoints carry are derived
    here, never loaded."""
    rules: list[tuple[str, str | None]] = [(r"model\.layers\.\d+\.self_attn\.rotary_emb\..*",
                                            None)]
    if config is not None and config.tie_word_embeddings:
        rules.append((r"lm_head\.weight", None))
    return WeightSpec(patterns=("model*.safetensors",), key_map=tuple(rules))


def kv_spec(config: OrpheusConfig, *, dtype: torch.dtype = torch.float32) -> KVSpec:
    """One KV layer per decoder layer, every KV head (the engine divides them under TP),
    1-D positions, and the logits of each sequence's last new token."""
    return KVSpec(num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                  num_heads=config.num_attention_heads,
                  head_dim=config.head_dim, dtype=dtype, outputs={"logits": "last"})
