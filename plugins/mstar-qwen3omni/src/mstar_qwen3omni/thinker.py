"""Qwen3-Omni's Thinker text LLM: the KV-cache node `Thinker`.

A Qwen3-MoE decoder: GQA attention with per-head QK-norm, interleaved multimodal RoPE over
3-axis positions (t, h, w) and, in every layer the config makes sparse, a 128-expert
top-8 MoE MLP (dense `GatedMLP` elsewhere). Media enter as rows: where `mm_mask` is 1 the
input embedding is the encoder's `mm_embeds` row instead of `embed_tokens(input_ids)`, and
an image/video row's `deepstack` features (one per early decoder layer, from the vision
tower's intermediate layers) are added to the hidden state after decoder layers 0..k-1, as
`Qwen3OmniMoeThinkerTextModel` does.

Besides the logits, every row the node runs can yield the two streams the Talker reads:
`thinker_embeds` (the input embedding, after media splicing: HF's `hidden_states[0]`) and
`thinker_hidden` (the output of decoder layer `accept_hidden_layer - 1`: HF's
`hidden_states[accept_hidden_layer]`). Each output is computed only on the rows the batch
asks for. Module names are the hub's below `thinker.` (`thinker_weight_spec`), and every
projection is a TP layer (whole heads per rank; each expert's intermediate features split).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mstar.model import ExtraSpec, ForwardBatch, KVSpec
from mstar.model.layers import (
    ColumnParallelLinear,
    GatedMLP,
    PagedAttention,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SparseMoE,
    VocabParallelEmbedding,
    heads_per_rank,
)
from mstar.weights.spec import WeightSpec

CosSin = tuple[torch.Tensor, torch.Tensor]
#: Decoder layers that take deepstack features: len(vision_config.deepstack_visual_indexes).
DEEPSTACK_LAYERS = 3


class RopeSettings:
    """`rope_base` and `mrope_section` of a config holding HF's RoPE fields, written as
    transformers 5 writes them (`rope_parameters`) or as a hub config.json does
    (`rope_theta` + `rope_scaling`): one reading for the Thinker's, the Talker's and the
    code predictor's configs."""

    rope_theta: float | None
    rope_scaling: Mapping[str, Any] | None
    rope_parameters: Mapping[str, Any] | None
    #: The base when no field gives one.
    default_rope_theta: ClassVar[float] = 1_000_000.0

    def _rope(self) -> dict[str, Any]:
        return {**(self.rope_scaling or {}), **(self.rope_parameters or {})}

    @property
    def rope_base(self) -> float:
        return float(self._rope().get("rope_theta") or self.rope_theta
                     or self.default_rope_theta)

    @property
    def mrope_section(self) -> tuple[int, ...]:
        return tuple(self._rope().get("mrope_section", (24, 20, 20)))


@dataclass(frozen=True)
class ThinkerTextConfig(RopeSettings):
    """Fields of `Qwen3OmniMoeTextConfig` (the thinker's `text_config`), by name; defaults
    are `Qwen/Qwen3-Omni-30B-A3B-Instruct`'s. The RoPE settings come as transformers 5
    writes them (`rope_parameters`) or as the hub's config.json does (`rope_theta` and
    `rope_scaling`); `rope_base` and `mrope_section` read either. `intermediate_size` only
    sizes dense layers, which the 30B-A3B has none of."""

    vocab_size: int = 152064
    hidden_size: int = 2048
    intermediate_size: int = 768
    moe_intermediate_size: int = 768
    num_hidden_layers: int = 48
    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float | None = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: Sequence[int] = ()
    tie_word_embeddings: bool = False

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer `layer` has the MoE MLP (HF's rule)."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


class QKNormAttention(nn.Module):
    """`self_attn` of the Thinker and the Talker: q/k/v column-parallel (whole heads per
    rank), o row-parallel, q/k RMS-normed per head before RoPE, K/V in the paged cache."""

    def __init__(self, cfg: Any, layer_idx: int, tp: dict[str, Any], head_dim: int):
        super().__init__()
        self.heads, self.kv_heads = heads_per_rank(cfg.num_attention_heads,
                                                   cfg.num_key_value_heads, tp["tp_size"])
        self.head_dim = d = head_dim
        q_width, kv_width = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        bias = cfg.attention_bias
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, q_width, bias, **tp)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, kv_width, bias, **tp)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, kv_width, bias, **tp)
        self.o_proj = RowParallelLinear(q_width, cfg.hidden_size, bias, **tp)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = PagedAttention(layer_idx, self.heads, self.kv_heads, d)

    def forward(self, x: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        n = x.shape[0]
        q = self.q_norm(self.q_proj(x).view(n, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(n, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        q, k = RotaryEmbedding.apply(q, k, cos_sin)
        return self.o_proj(self.attn(q, k, v).reshape(n, self.heads * self.head_dim))


class DecoderLayer(nn.Module):
    """A pre-norm decoder layer of the Thinker or the Talker around the given `mlp`."""

    def __init__(self, cfg: Any, layer_idx: int, tp: dict[str, Any], *, head_dim: int,
                 mlp: nn.Module):
        super().__init__()
        self.self_attn = QKNormAttention(cfg, layer_idx, tp, head_dim)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


def _thinker_mlp(cfg: ThinkerTextConfig, layer_idx: int, tp: dict[str, Any]) -> nn.Module:
    if cfg.is_sparse(layer_idx):
        return SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                         cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                         act=cfg.hidden_act, **tp)
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act, **tp)


class _TextModel(nn.Module):
    """`thinker.model.*` of the checkpoint."""

    def __init__(self, cfg: ThinkerTextConfig, tp: dict[str, Any]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **tp)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, tp, head_dim=cfg.head_dim, mlp=_thinker_mlp(cfg, i, tp))
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def thinker_extras(cfg: ThinkerTextConfig,
                   deepstack_layers: int = DEEPSTACK_LAYERS) -> tuple[ExtraSpec, ...]:
    """The per-token extras `Thinker.forward` reads (absent: zeros, i.e. text rows).
    `deepstack` is read on `mm_mask` rows only."""
    return (
        ExtraSpec("mm_mask", "token", dtype=torch.long),
        ExtraSpec("mm_embeds", "token", (cfg.hidden_size,)),
        ExtraSpec("deepstack", "token", (deepstack_layers, cfg.hidden_size)),
    )


class Thinker(nn.Module):
    """The KV-cache node `Thinker`: a ragged `ForwardBatch` in (positions [3, T], or [T]
    for rows whose three axes are equal; the extras of `thinker_extras`), out only on the
    rows the batch asks for: `logits`, `thinker_embeds`, `thinker_hidden` [rows, H]."""

    def __init__(self, cfg: ThinkerTextConfig, *, accept_hidden_layer: int,
                 tp_rank: int = 0, tp_size: int = 1, tp_group: Any = None):
        super().__init__()
        if not 0 < accept_hidden_layer < cfg.num_hidden_layers:
            # HF's hidden_states[0] and [num_hidden_layers] are the embeddings and the
            # normed output, not a decoder layer's output.
            raise ValueError(f"accept_hidden_layer={accept_hidden_layer} must name a decoder "
                             f"layer's output: 1..{cfg.num_hidden_layers - 1}")
        self.config, self.accept_hidden_layer = cfg, accept_hidden_layer
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        self.model = _TextModel(cfg, tp)
        tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tied_to=tied, **tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_base,
                                      sections=cfg.mrope_section, interleaved=True)

    def _embed(self, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input embeddings (token embeddings, or the `mm_embeds` row where `mm_mask` is 1)
        and the media rows' indices (None when there are none: text and decode steps)."""
        x = self.model.embed_tokens(batch.input_ids)
        mask = batch.extras.get("mm_mask")
        media = None if mask is None else mask.nonzero().squeeze(1).to(x.device)
        if media is None or media.numel() == 0:
            return x, None
        mm = batch.extras["mm_embeds"][media].to(device=x.device, dtype=x.dtype)
        return x.index_copy(0, media, mm), media

    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        x, media = self._embed(batch)
        out: dict[str, torch.Tensor] = {}
        if batch.wants("thinker_embeds"):
            out["thinker_embeds"] = x[batch.output_rows("thinker_embeds")]
        # Deepstack features exist only on media rows (zeros on audio ones).
        deepstack = None if media is None else batch.extras.get("deepstack")
        if deepstack is not None:
            deepstack = deepstack[media].to(device=x.device, dtype=x.dtype)
        cos_sin = self.rotary.cos_sin(batch.positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos_sin)
            if i + 1 == self.accept_hidden_layer and batch.wants("thinker_hidden"):
                out["thinker_hidden"] = x[batch.output_rows("thinker_hidden")]
            if deepstack is not None and i < deepstack.shape[1]:
                x = x.index_add(0, media, deepstack[:, i])
        if batch.wants("logits"):
            out["logits"] = self.lm_head(self.model.norm(x[batch.output_rows("logits")]))
        return out


def thinker_weight_spec(cfg: ThinkerTextConfig | None = None) -> WeightSpec:
    """From the full Qwen3-Omni checkpoint: `thinker.model.*` and `thinker.lm_head.weight`
    without the `thinker.` prefix; every other key (the encoders, the Talker, Code2Wav) is
    another node's. A tied head is the embedding, so a stored head is then ignored."""
    tied = ((r"thinker\.lm_head\.weight", None),) if cfg is not None and \
        cfg.tie_word_embeddings else ()
    return WeightSpec(key_map=(*tied,
                               (r"thinker\.((?:model|lm_head)\..*)", r"\1"),
                               (r".*", None)))


def thinker_kv_spec(cfg: ThinkerTextConfig, *, deepstack_layers: int = DEEPSTACK_LAYERS,
                    dtype: torch.dtype = torch.float32) -> KVSpec:
    """One KV layer per decoder layer, 3 position axes, the media extras, and the outputs:
    the last row's logits, the Talker's two streams on every row."""
    return KVSpec(num_layers=cfg.num_hidden_layers, num_kv_heads=cfg.num_key_value_heads,
                  num_heads=cfg.num_attention_heads,
                  head_dim=cfg.head_dim, dtype=dtype, position_axes=3,
                  extras=thinker_extras(cfg, deepstack_layers),
                  outputs={"logits": "last", "thinker_embeds": "all", "thinker_hidden": "all"})
