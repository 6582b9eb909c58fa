"""BAGEL's language model: a Qwen2 Mixture-of-Transformers with two experts, the KV-cache
node `LLM`.

Every decoder layer holds two full weight stacks: the understanding expert (Qwen2 with QKV
bias and per-head QK-norm: text, ViT features) and the generation expert (`*_moe_gen`:
VAE latents). Each token is run by its expert's norms, projections and MLP and normed at
the end by its expert's final norm; attention is joint over all tokens, so both experts
read and write the same KV layers (BAGEL's `Qwen2MoTDecoderLayer` in "gen" mode, which in
"und" mode is the same rule with every token in expert 0).

Latent tokens enter as `vae2llm(x_t) + time_embedder(t) + latent_pos_embed(position)`, as
BAGEL's `_forward_flow` and `forward_cache_update_vae` build them, and leave as
`llm2vae(hidden)`, the flow velocity. Module names are the checkpoint's (`ema.safetensors`)
without its `language_model.` prefix (`llm_key_map`), so it loads through the shared loader;
the Qwen2 projections are TP layers, so `tp_size > 1` shards them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mstar.model import ExtraSpec, ForwardBatch
from mstar.model.experts import ExpertRouting
from mstar.model.layers import (
    ColumnParallelLinear,
    GatedMLP,
    PagedAttention,
    ParallelLMHead,
    PositionTable,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TimestepEmbedder,
    VocabParallelEmbedding,
    heads_per_rank,
)

CosSin = tuple[torch.Tensor, torch.Tensor]
#: Expert 1's modules carry this suffix in the checkpoint; expert 0's carry none.
GEN_SUFFIX = "_moe_gen"


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 fields of BAGEL's `llm_config.json` (defaults: BAGEL-7B-MoT's)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qk_norm: bool = True

    @property
    def head_dim(self) -> int:
        """Qwen2 has no `head_dim` field: heads split the hidden size."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls) -> LLMConfig:
        """A few-kilobyte model for CPU tests: head_dim 16, grouped-query attention."""
        return cls(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                   max_position_embeddings=512)


def kv_extras(cfg: LLMConfig, latent_dim: int) -> tuple[ExtraSpec, ...]:
    """The extras `BagelLLM.forward` reads (the node's `KVSpec.extras`)."""
    return (
        ExtraSpec("expert_ids", "token", dtype=torch.long),
        ExtraSpec("vit_mask", "token", dtype=torch.long),
        ExtraSpec("vit_embeds", "token", (cfg.hidden_size,)),
        ExtraSpec("latents", "token", (latent_dim,)),
        ExtraSpec("latent_pos_ids", "token", dtype=torch.long),
        ExtraSpec("t", "seq"),
    )


def llm_key_map(cfg: LLMConfig) -> tuple[tuple[str, str | None], ...]:
    """`WeightSpec.key_map` from `ema.safetensors` to `BagelLLM`: the language model without
    its prefix, the four latent adapters as they are, nothing else (ViT, connector). A tied
    head is the embedding, so a stored `lm_head` is then ignored."""
    tied = ((r"language_model\.lm_head\.weight", None),) if cfg.tie_word_embeddings else ()
    return (*tied,
            (r"language_model\.(.*)", r"\1"),
            (r"((?:vae2llm|llm2vae|time_embedder|latent_pos_embed)\..*)", r"\1"),
            (r".*", None))


def _expert(module: nn.Module, name: str, e: int) -> nn.Module:
    """Expert `e`'s copy of submodule `name` of `module`."""
    return getattr(module, name + (GEN_SUFFIX if e else ""))


class _Attention(nn.Module):
    """`self_attn`: both experts' q/k/v (with bias), o (without) and per-head q/k norms."""

    def __init__(self, cfg: LLMConfig, layer_idx: int, tp: dict[str, Any]):
        super().__init__()
        self.heads, self.kv_heads = heads_per_rank(cfg.num_attention_heads,
                                                   cfg.num_key_value_heads, tp["tp_size"])
        self.head_dim = d = cfg.head_dim
        q_width, kv_width = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        for s in ("", GEN_SUFFIX):
            setattr(self, f"q_proj{s}", ColumnParallelLinear(cfg.hidden_size, q_width, True, **tp))
            setattr(self, f"k_proj{s}", ColumnParallelLinear(cfg.hidden_size, kv_width, True,
                                                             **tp))
            setattr(self, f"v_proj{s}", ColumnParallelLinear(cfg.hidden_size, kv_width, True,
                                                             **tp))
            setattr(self, f"o_proj{s}", RowParallelLinear(q_width, cfg.hidden_size, **tp))
            for name in ("q_norm", "k_norm"):
                setattr(self, name + s, RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm
                        else nn.Identity())
        self.attn = PagedAttention(layer_idx, self.heads, self.kv_heads, d)

    def qkv(self, x: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert `e`'s q [n, H, D], k and v [n, KVH, D] of its (normed) rows `x`, q and k
        normed per head (before RoPE, as BAGEL)."""
        n = x.shape[0]
        q = _expert(self, "q_proj", e)(x).view(n, self.heads, self.head_dim)
        k = _expert(self, "k_proj", e)(x).view(n, self.kv_heads, self.head_dim)
        v = _expert(self, "v_proj", e)(x).view(n, self.kv_heads, self.head_dim)
        return _expert(self, "q_norm", e)(q), _expert(self, "k_norm", e)(k), v


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int, tp: dict[str, Any]):
        super().__init__()
        self.self_attn = _Attention(cfg, layer_idx, tp)
        for s in ("", GEN_SUFFIX):
            setattr(self, f"mlp{s}", GatedMLP(cfg.hidden_size, cfg.intermediate_size, **tp))
            setattr(self, f"input_layernorm{s}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"post_attention_layernorm{s}",
                    RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, h: dict[int, torch.Tensor], route: ExpertRouting,
                rotary: RotaryEmbedding, cos_sin: CosSin) -> dict[int, torch.Tensor]:
        """Each expert's rows `h[e]` (compact) -> the same after this layer."""
        attn = self.self_attn
        q, k, v = {}, {}, {}
        for e, x in h.items():
            q[e], k[e], v[e] = attn.qkv(_expert(self, "input_layernorm", e)(x), e)
        q_all, k_all = rotary.apply(route.scatter(q), route.scatter(k), cos_sin)
        o = attn.attn(q_all, k_all, route.scatter(v)).reshape(route.num_tokens, -1)
        out = {}
        for e, x in h.items():
            x = x + _expert(attn, "o_proj", e)(route.gather(o, e))
            out[e] = x + _expert(self, "mlp", e)(_expert(self, "post_attention_layernorm", e)(x))
        return out


class _Qwen2Model(nn.Module):
    """`language_model.model.*` of the checkpoint."""

    def __init__(self, cfg: LLMConfig, tp: dict[str, Any]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **tp)
        self.layers = nn.ModuleList(_DecoderLayer(cfg, i, tp)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class BagelLLM(nn.Module):
    """The KV-cache node `LLM`: a ragged `ForwardBatch` in (1-D positions [T]; the extras of
    `kv_extras`, each at its declared default when absent), named outputs out, each only on
    `batch.output_rows(name)`: `logits` (the LM head) and `velocity` (`llm2vae`), both over
    the final hidden normed by each row's own expert's final norm.

    Token rows: expert 0 takes `embed_tokens(input_ids)`, or the `vit_embeds` row where
    `vit_mask` is 1; expert 1 (`expert_ids` 1) takes its latent `latents` at flow time `t`
    (of its sequence) and flattened position `latent_pos_ids`.
    """

    def __init__(self, cfg: LLMConfig, *, latent_dim: int, max_latent_size: int,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None):
        super().__init__()
        self.config = cfg
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        self.model = _Qwen2Model(cfg, tp)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tied_to=tied, **tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.vae2llm = nn.Linear(latent_dim, cfg.hidden_size)
        self.llm2vae = nn.Linear(cfg.hidden_size, latent_dim)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size)
        self.latent_pos_embed = PositionTable(max_latent_size, cfg.hidden_size)
        self.extra_specs = {spec.name: spec for spec in kv_extras(cfg, latent_dim)}

    def _extra(self, batch: ForwardBatch, name: str) -> torch.Tensor:
        """Extra `name` of the batch, or its declared default (T or B rows)."""
        if name in batch.extras:
            return batch.extras[name]
        spec = self.extra_specs[name]
        rows = batch.num_tokens if spec.per == "token" else len(batch.seqs)
        return torch.full((rows, *spec.shape), spec.default, dtype=spec.dtype,
                          device=batch.input_ids.device)

    def _embed(self, batch: ForwardBatch, route: ExpertRouting, e: int) -> torch.Tensor:
        """Input embeddings of expert `e`'s rows, in its compact order."""
        vit = route.gather(self._extra(batch, "vit_mask"), e).bool()
        if e == 0:
            x = self.model.embed_tokens(route.gather(batch.input_ids, 0))
            if bool(vit.any()):
                vit_embeds = route.gather(self._extra(batch, "vit_embeds"), 0)
                x = torch.where(vit[:, None], vit_embeds.to(x.dtype), x)
            return x
        if bool(vit.any()):
            raise ValueError("a ViT row (vit_mask 1) is routed to the generation expert "
                             "(expert_ids 1); ViT rows belong to expert 0")
        dtype = self.vae2llm.weight.dtype
        lengths = torch.tensor([s.length for s in batch.seqs], device=vit.device)
        seq_of_row = torch.repeat_interleave(torch.arange(len(batch.seqs), device=vit.device),
                                             lengths)
        t = self._extra(batch, "t")[route.gather(seq_of_row, 1)]
        latents = route.gather(self._extra(batch, "latents"), 1).to(dtype)
        pos = self.latent_pos_embed(route.gather(self._extra(batch, "latent_pos_ids"), 1))
        return self.vae2llm(latents) + self.time_embedder(t) + pos.to(dtype)

    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        ids = batch.input_ids
        route = ExpertRouting(self._extra(batch, "expert_ids").to(device=ids.device,
                                                                   dtype=torch.long))
        h = {e: self._embed(batch, route, e) for e in route.present()}
        cos_sin = self.rotary.cos_sin(batch.positions)
        for layer in self.model.layers:
            h = layer(h, route, self.rotary, cos_sin)
        heads = {"logits": self.lm_head, "velocity": self.llm2vae}
        wanted = [name for name in heads if batch.wants(name)]
        if not wanted:
            return {}
        final = route.scatter({e: _expert(self.model, "norm", e)(x) for e, x in h.items()})
        return {name: heads[name](final[batch.output_rows(name)]) for name in wanted}
