"""Qwen3-Omni's Talker: the KV-cache node `Talker`, speaking the Thinker's text as codec
frames (HF `Qwen3OmniMoeTalkerForConditionalGeneration` and the Talker half of
`Qwen3OmniMoeForConditionalGeneration.generate`).

The Talker is a Qwen3-MoE decoder (per-head QK-norm, interleaved M-RoPE over 3-axis
positions, every layer a sparse MoE with a sigmoid-gated shared expert) whose tokens are
group-0 codes of a 16-codebook codec. Each input row is a *text part* plus a *codec part*:

- text part: a Thinker row projected to the Talker's width, `text_projection` of a token
  embedding (`thinker_embeds`) or `hidden_projection` of a multimodal row's middle-layer
  state (`thinker_hidden`), or one of the `tts_pad`/`tts_bos`/`tts_eos` rows
  (`text_projection` of the Thinker's embeddings of those tokens);
- codec part: nothing, the `codec_embedding` of a codec special id (prompt rows), or, on a
  decode row, the sum of the embeddings of the previous frame's 16 codes: its group-0 code
  (the row's `input_ids`) and the 15 residual codes the code predictor draws from the
  Talker's previous final hidden state, inside this forward (`CodePredictor.predict`).

Per-token extras (`talker_extras`): `talker_text` [H_thinker] (the Thinker row),
`talker_kind` (`KIND_*`: which projection or tts row makes the text part), `talker_codec`
(a codec id whose embedding is added, −1 none), `talker_decode` (1: a decode row, run the
code predictor), `talker_prev_hidden` [H] (a decode row's previous final hidden state).
Outputs (`talker_kv_spec`), each on the last row of a sequence's chunk: `logits` (the
reserved codec ids masked as HF's `suppress_tokens`; the engine samples the group-0 code
into `token_ids`), `talker_hidden` (the normed final hidden state, the next step's
`talker_prev_hidden`), `codes` [1, 16] (a decode row's frame: its group-0 code and the 15
residual codes; wanted only by the decode invocations, see `talker_walk`) and
`talker_text_done` (1 once the text part was `tts_eos` or `tts_pad`).

The prompt (`talker_prompt_plan` on the host, `talker_prepare` per invocation) is HF's:
the Thinker prompt's user-role rows, then 9 assistant rows carrying the codec's
think/speaker/bos specials; each later step adds the next streamed Thinker token row,
then `tts_eos` once the stream ended, then `tts_pad`.

Not yet supported: rebuilding a preempted Talker sequence. The engine recomputes a
sequence from its recorded chunks, but a decode row's input depends on residual codes drawn
inside the forward (not recorded), and a recompute step has no request to draw for; the
request then fails. Recording them needs the engine to keep node-made per-token inputs.

The Talker needs the Thinker's embeddings of the three tts tokens. `mstar.weights` loads
whole tensors (a TP rank reads its shard, never chosen rows), so the node holds the
Thinker's whole `embed_tokens` table (`thinker_embed`, loaded from
`thinker.model.embed_tokens.weight`): 152k × 2048 entries, 0.6 GB in bfloat16 on the
Talker's rank, to use 3 rows of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mstar.graph.primitives import GraphNode, Loop, Sequential
from mstar.model import ExtraSpec, ForwardBatch, KVSpec, config_from_fields
from mstar.model.layers import (
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    SparseMoE,
    VocabParallelEmbedding,
)
from mstar.model.layers.mlp import ACTIVATIONS
from mstar.weights import WeightSpec
from mstar_qwen3omni.thinker import DecoderLayer, RopeSettings

CosSin = tuple[torch.Tensor, torch.Tensor]
#: `talker_kind`: what makes a row's text part.
KIND_TEXT, KIND_MM, KIND_PAD, KIND_BOS, KIND_EOS = range(5)
#: HF masks the top 1024 ids of the Talker's vocabulary (codec specials) but its end token.
RESERVED_CODEC_IDS = 1024
#: The assistant part of the prompt: 3 header rows, 4 pads, bos, the first text row.
ASSISTANT_ROWS = 9
SampleFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TalkerTextConfig(RopeSettings):
    """`Qwen3OmniMoeTalkerTextConfig`'s fields (defaults: Qwen3-Omni-30B-A3B-Instruct's).
    Every layer is sparse (HF's Talker layer always builds the MoE block). `head_dim`
    absent means hidden / heads, as HF reads it."""

    vocab_size: int = 3072
    hidden_size: int = 1024
    intermediate_size: int = 2048
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float | None = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    moe_intermediate_size: int = 384
    num_experts: int = 128
    num_experts_per_tok: int = 6
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 768

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads



@dataclass(frozen=True)
class CodePredictorConfig(RopeSettings):
    """`Qwen3OmniMoeTalkerCodePredictorConfig`'s fields (a small dense Qwen3; defaults:
    the real model's)."""

    vocab_size: int = 2048
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 5
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float | None = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    rope_parameters: dict[str, Any] | None = None
    num_code_groups: int = 16
    default_rope_theta: ClassVar[float] = 10_000.0


@dataclass(frozen=True)
class TalkerConfig:
    """`Qwen3OmniMoeTalkerConfig`'s top-level fields, its two sub-configs, and what the
    Talker needs of the whole model's config: the Thinker's vocabulary size and the tts
    token ids (`Qwen3OmniMoeConfig.tts_*_token_id`). Build with `from_fields`."""

    text_config: TalkerTextConfig = field(default_factory=TalkerTextConfig)
    code_predictor_config: CodePredictorConfig = field(default_factory=CodePredictorConfig)
    num_code_groups: int = 16
    thinker_hidden_size: int = 2048
    thinker_vocab_size: int = 152064
    accept_hidden_layer: int = 24
    codec_eos_token_id: int = 2150
    codec_nothink_id: int = 2155
    codec_think_bos_id: int = 2156
    codec_think_eos_id: int = 2157
    codec_pad_id: int = 2148
    codec_bos_id: int = 2149
    audio_token_id: int = 151675
    image_token_id: int = 151655
    video_token_id: int = 151656
    speaker_id: dict[str, int] = field(default_factory=dict)
    tts_pad_token_id: int = 151671
    tts_bos_token_id: int = 151672
    tts_eos_token_id: int = 151673

    @classmethod
    def from_fields(cls, talker: Mapping[str, Any], **overrides: Any) -> TalkerConfig:
        """From HF's talker config dict (its `text_config` and `code_predictor_config`
        nested), plus `overrides` (the Thinker's vocabulary size, the tts ids)."""
        text = dict(talker.get("text_config") or {})
        if "num_local_experts" in text:  # transformers' name for it in a saved config
            text.setdefault("num_experts", text["num_local_experts"])
        return config_from_fields(
            cls, talker, text_config=config_from_fields(TalkerTextConfig, text),
            code_predictor_config=config_from_fields(
                CodePredictorConfig, talker.get("code_predictor_config") or {}),
            speaker_id=dict(talker.get("speaker_id") or {}), **overrides)

    @property
    def mm_token_ids(self) -> tuple[int, int, int]:
        return (self.audio_token_id, self.image_token_id, self.video_token_id)


# -- the code predictor -------------------------------------------------------------------


class _DenseAttention(nn.Module):
    """Code-predictor attention over a batch [B, T] with its own K/V (plain tensors):
    QK-norm per head, 1-D RoPE, causal."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        d, bias = cfg.head_dim, cfg.attention_bias
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, d)
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin,
                kv: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x [B, T, H]; `kv` this layer's cached [k, v] ([B, KVH, T0, D]) or None."""
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        q, k = RotaryEmbedding.apply(q, k, cos_sin)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if kv is not None:
            k, v = torch.cat([kv[0], k], dim=2), torch.cat([kv[1], v], dim=2)
        past = k.shape[2] - t
        i = torch.arange(t, device=x.device)[:, None] + past
        mask = torch.arange(k.shape[2], device=x.device)[None, :] <= i
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                           enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1)), [k, v]


class _DenseMLP(nn.Module):
    """The code predictor's gated MLP, of plain `nn.Linear`s, not core's `GatedMLP`: the
    code predictor is replicated whole on every TP rank of the Talker, and core's parallel
    layers mark their weights as split (`mark_sharded`), so the loader and the per-rank
    parameter reports would take it for a shard."""

    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class _DenseLayer(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.self_attn = _DenseAttention(cfg)
        self.mlp = _DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos_sin: CosSin,
                kv: list[torch.Tensor] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, kv = self.self_attn(self.input_layernorm(x), cos_sin, kv)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class _CodePredictorModel(nn.Module):
    """`code_predictor.model.*`: the layers, the final norm and one embedding table per
    residual group."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.layers = nn.ModuleList(_DenseLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, cfg.hidden_size) for _ in range(cfg.num_code_groups - 1))


class CodePredictor(nn.Module):
    """`Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration`: fills a frame's
    residual codebooks 1..15 from the Talker's final hidden state and the frame's group-0
    code, one group per step, each step's code embedded by that group's table and fed
    back. Replicated on every TP rank (it is small); its K/V lives for one `predict`."""

    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.config = cfg
        self.model = _CodePredictorModel(cfg)
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                                     for _ in range(cfg.num_code_groups - 1))
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_base)

    def _run(self, x: torch.Tensor, start: int,
             kv: list[list[torch.Tensor] | None]) -> torch.Tensor:
        """x [B, T, H] at positions start.. -> the normed last row [B, H]; `kv` updated."""
        cos_sin = self.rotary.cos_sin(torch.arange(start, start + x.shape[1], device=x.device))
        for i, layer in enumerate(self.model.layers):
            x, kv[i] = layer(x, cos_sin, kv[i])
        return self.model.norm(x[:, -1])

    def predict(self, prev_hidden: torch.Tensor, code0_embed: torch.Tensor,
                sample: SampleFn) -> tuple[torch.Tensor, torch.Tensor]:
        """`prev_hidden` [B, H] (the Talker's normed final hidden state of the step that
        drew code 0) and `code0_embed` [B, H] (the Talker's `codec_embedding` of code 0) ->
        (codes of groups 1..G−1 [B, G−1], the sum of their embeddings [B, H]).
        `sample(g, logits [B, V])` draws group g's codes [B]."""
        groups = self.config.num_code_groups
        kv: list[list[torch.Tensor] | None] = [None] * len(self.model.layers)
        x = torch.stack([prev_hidden, code0_embed], dim=1)
        codes, total = [], torch.zeros_like(prev_hidden)
        for g in range(1, groups):
            hidden = self._run(x, 0 if g == 1 else g, kv)
            code = sample(g, self.lm_head[g - 1](hidden)).to(prev_hidden.device)
            embed = self.model.codec_embedding[g - 1](code)
            codes.append(code)
            total = total + embed
            x = embed[:, None]
        return torch.stack(codes, dim=1), total


# -- the Talker ----------------------------------------------------------------------------


class ResizeMLP(nn.Module):
    """Thinker width -> Talker width: fc2(act(fc1(x))) (`Qwen3OmniMoeTalkerResizeMLP`)."""

    def __init__(self, cfg: TalkerConfig):
        super().__init__()
        text = cfg.text_config
        self.act = ACTIVATIONS[text.hidden_act]
        self.linear_fc1 = nn.Linear(cfg.thinker_hidden_size, text.intermediate_size)
        self.linear_fc2 = nn.Linear(text.intermediate_size, text.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class _TalkerModel(nn.Module):
    """`talker.model.*` of the checkpoint."""

    def __init__(self, cfg: TalkerTextConfig, tp: dict[str, Any]):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, tp, head_dim=cfg.attn_head_dim, mlp=SparseMoE(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                act=cfg.hidden_act, **tp))
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.codec_embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **tp)


def talker_extras(cfg: TalkerConfig) -> tuple[ExtraSpec, ...]:
    """The per-token extras `Talker.forward` reads (see the module docstring)."""
    h = cfg.text_config.hidden_size
    return (
        ExtraSpec("talker_text", "token", (cfg.thinker_hidden_size,)),
        ExtraSpec("talker_kind", "token", dtype=torch.long, default=KIND_TEXT),
        ExtraSpec("talker_codec", "token", dtype=torch.long, default=-1),
        ExtraSpec("talker_decode", "token", dtype=torch.long),
        ExtraSpec("talker_prev_hidden", "token", (h,)),
    )


class Talker(nn.Module):
    """The KV-cache node `Talker`: a ragged `ForwardBatch` (positions [3, T] or [T], the
    extras of `talker_extras`) in, the outputs of `talker_kv_spec` out, each only on the
    rows the batch asks for. The code predictor draws with `batch.ctx.sample` at site
    "code_predictor", keyed per frame and group."""

    def __init__(self, cfg: TalkerConfig, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Any = None):
        super().__init__()
        self.config = cfg
        text = cfg.text_config
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        self.model = _TalkerModel(text, tp)
        self.codec_head = ParallelLMHead(text.vocab_size, text.hidden_size, **tp)
        self.text_projection = ResizeMLP(cfg)
        self.hidden_projection = ResizeMLP(cfg)
        self.code_predictor = CodePredictor(cfg.code_predictor_config)
        self.thinker_embed = VocabParallelEmbedding(cfg.thinker_vocab_size,
                                                    cfg.thinker_hidden_size, **tp)
        self.rotary = RotaryEmbedding(text.attn_head_dim, text.rope_base,
                                      sections=text.mrope_section, interleaved=True)
        if cfg.num_code_groups != cfg.code_predictor_config.num_code_groups:
            raise ValueError(f"num_code_groups {cfg.num_code_groups} != the code predictor's "
                             f"{cfg.code_predictor_config.num_code_groups}")

    def tts_rows(self) -> torch.Tensor:
        """`text_projection` of the Thinker's embeddings of tts pad, bos, eos: [3, H]."""
        ids = torch.tensor([self.config.tts_pad_token_id, self.config.tts_bos_token_id,
                            self.config.tts_eos_token_id], device=self.codec_head.weight.device)
        return self.text_projection(self.thinker_embed(ids))

    def embed(self, extras: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
        """Input rows' text part plus their codec special's embedding [rows, H] (a decode
        row's frame embedding is added by `forward`)."""
        kind = extras["talker_kind"]
        text = extras["talker_text"].to(self.text_projection.linear_fc1.weight.dtype)
        x = self.text_projection.linear_fc2.bias.new_zeros(rows, self.config.text_config
                                                           .hidden_size)
        for k, project in ((KIND_TEXT, self.text_projection), (KIND_MM, self.hidden_projection)):
            at = (kind == k).nonzero().flatten()
            if at.numel():
                x[at] = project(text[at])
        special = (kind >= KIND_PAD).nonzero().flatten()
        if special.numel():
            x[special] = self.tts_rows()[kind[special] - KIND_PAD]
        codec = extras["talker_codec"]
        with_codec = (codec >= 0).nonzero().flatten()
        if with_codec.numel():
            x[with_codec] = x[with_codec] + self.model.codec_embedding(codec[with_codec])
        return x

    def _sampler(self, batch: ForwardBatch, rows: torch.Tensor) -> SampleFn:
        """`sample(g, logits)` for the decode `rows`: each row's sequence draws group g at
        site "code_predictor", step (its cached length) · (G − 1) + g − 1: unique per frame
        and group, whatever the batch."""
        if batch.ctx is None:
            raise RuntimeError("the Talker's code predictor samples through batch.ctx")
        starts = torch.tensor([s.start for s in batch.seqs])
        seq_of = (torch.searchsorted(starts, rows.cpu(), right=True) - 1).tolist()
        per_frame = self.config.num_code_groups - 1

        def sample(g: int, logits: torch.Tensor) -> torch.Tensor:
            return torch.cat([
                batch.ctx.sample(i, logits[r:r + 1], "code_predictor",
                                 batch.seqs[i].context_len * per_frame + g - 1)
                for r, i in enumerate(seq_of)])
        return sample

    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        extras = batch.extras
        x = self.embed(extras, batch.num_tokens)
        decode = extras["talker_decode"].nonzero().flatten()
        frames = None
        if decode.numel():
            code0 = batch.input_ids[decode]
            code0_embed = self.model.codec_embedding(code0)
            prev = extras["talker_prev_hidden"][decode].to(x.dtype)
            residual, residual_embed = self.code_predictor.predict(
                prev, code0_embed, self._sampler(batch, decode))
            x[decode] = x[decode] + code0_embed + residual_embed
            frames = torch.cat([code0[:, None], residual], dim=1)
        cos_sin = self.rotary.cos_sin(batch.positions)
        for layer in self.model.layers:
            x = layer(x, cos_sin)
        out: dict[str, torch.Tensor] = {}
        if batch.wants("codes"):
            out["codes"] = self._frames(batch, decode, frames)
        if batch.wants("talker_text_done"):
            kind = extras["talker_kind"][batch.output_rows("talker_text_done")]
            out["talker_text_done"] = (kind == KIND_EOS) | (kind == KIND_PAD)
        wanted = [n for n in ("logits", "talker_hidden") if batch.wants(n)]
        if wanted:
            rows = torch.unique(torch.cat([batch.output_rows(n) for n in wanted]))
            final = self.model.norm(x[rows])

            def at(name: str) -> torch.Tensor:
                return final[torch.searchsorted(rows, batch.output_rows(name))]
            if batch.wants("talker_hidden"):
                out["talker_hidden"] = at("talker_hidden")
            if batch.wants("logits"):
                out["logits"] = self.suppress(self.codec_head(at("logits")))
        return out

    @staticmethod
    def _frames(batch: ForwardBatch, decode: torch.Tensor,
                frames: torch.Tensor | None) -> torch.Tensor:
        """The frame of each row that wants `codes`: only decode rows make one."""
        rows = batch.output_rows("codes")
        if frames is None or not torch.isin(rows, decode).all():
            raise ValueError("the Talker's `codes` are wanted of a row that is not a decode "
                             "row (the prefill invocation must not list `codes`)")
        return frames[torch.searchsorted(decode, rows)]

    def suppress(self, logits: torch.Tensor) -> torch.Tensor:
        """HF's `suppress_tokens`: the top 1024 ids (codec specials) but the end token can
        never be drawn."""
        vocab = self.config.text_config.vocab_size
        eos = self.config.codec_eos_token_id
        masked = logits.clone()
        masked[:, vocab - RESERVED_CODEC_IDS:] = float("-inf")
        masked[:, eos] = logits[:, eos]
        return masked


def talker_kv_spec(cfg: TalkerConfig, *, dtype: torch.dtype = torch.float32) -> KVSpec:
    """One KV layer per decoder layer, 3 position axes, the extras of `talker_extras`, every
    output at each sequence's last row."""
    text = cfg.text_config
    return KVSpec(num_layers=text.num_hidden_layers, num_kv_heads=text.num_key_value_heads,
                  num_heads=text.num_attention_heads,
                  head_dim=text.attn_head_dim, dtype=dtype, position_axes=3,
                  extras=talker_extras(cfg),
                  outputs={"logits": "last", "talker_hidden": "last", "codes": "last",
                           "talker_text_done": "last"})


def talker_weight_spec() -> WeightSpec:
    """From the full checkpoint: `talker.*` without its prefix (our names are the hub's
    below it) and the Thinker's token embedding table (`thinker_embed`, for the tts
    rows); every other key is another node's."""
    return WeightSpec(key_map=((r"talker\.(.*)", r"\1"),
                               (r"thinker\.model\.embed_tokens\.weight", "thinker_embed.weight"),
                               (r".*", None)))


# -- the prompt: host side and per invocation -----------------------------------------------


def talker_prompt_plan(thinker_ids: Sequence[int], cfg: TalkerConfig, *, im_start_id: int,
                       user_id: int, assistant_id: int) -> dict[str, Any]:
    """Which Thinker prompt rows make the Talker's prompt (HF `generate`): every row of a
    user turn (a row's role is the token after the `<|im_start|>` before it), in order, each
    multimodal (an audio/image/video token: `hidden_projection` of its `thinker_hidden`) or
    text; and the last `<|im_start|>assistant`, which must open the prompt's last three rows
    (the window's next row is then the first generated token's). Returns the host values
    `talker_user_rows`, `talker_mm_mask` and `talker_assistant_start`."""
    ids = list(thinker_ids)
    user_rows, role = [], None
    for i, token in enumerate(ids):
        if token == im_start_id:
            role = ids[i + 1] if i + 1 < len(ids) else None
        elif role is None and i == 0:
            role = ids[1] if len(ids) > 1 else None
        if role == user_id:
            user_rows.append(i)
    starts = [i for i in range(len(ids) - 1) if ids[i] == im_start_id and
              ids[i + 1] == assistant_id]
    if not starts or starts[-1] != len(ids) - 3:
        raise ValueError("the Talker's prompt needs a Thinker prompt ending with "
                         "'<|im_start|>assistant\\n' (three rows)")
    mm = set(cfg.mm_token_ids)
    return {"talker_user_rows": user_rows,
            "talker_mm_mask": [int(ids[i] in mm) for i in user_rows],
            "talker_assistant_start": starts[-1]}


def talker_prompt_rows(text_rows: torch.Tensor, hidden_rows: torch.Tensor,
                       host: Mapping[str, Any], cfg: TalkerConfig) -> dict[str, torch.Tensor]:
    """The Talker prompt's extras from the Thinker's rows of its prompt plus the first
    generated token (`thinker_embeds` as `text_rows`, `thinker_hidden` as `hidden_rows`,
    [P + 1, H_thinker]) and the host values of `talker_prompt_plan` and `talker_speaker`:
    `talker_text`, `talker_kind`, `talker_codec` of HF's user part then assistant part.

    A Thinker that stopped at its first token (an end token, or `max_tokens` 1) fed no
    generated row: its stream holds the prompt's rows only. HF's `generate` fails there;
    the Talker is told the text ended at once (`tts_eos` in the first text's place)."""
    user = torch.tensor(host["talker_user_rows"], dtype=torch.long)
    mm = torch.tensor(host["talker_mm_mask"], dtype=torch.bool)
    a = int(host["talker_assistant_start"])
    if text_rows.shape[0] not in (a + 3, a + 4):
        raise ValueError(f"the Talker's first window has {text_rows.shape[0]} rows; the "
                         f"prompt's {a + 3} and the first generated token's were expected")
    zero = text_rows.new_zeros(1, text_rows.shape[1])
    first = text_rows[a + 3:] if text_rows.shape[0] == a + 4 else zero
    first_kind = KIND_TEXT if text_rows.shape[0] == a + 4 else KIND_EOS
    user_text = torch.where(mm[:, None], hidden_rows[user], text_rows[user])
    text = torch.cat([user_text, text_rows[a:a + 3], zero.expand(5, -1), first])
    kind = torch.cat([torch.where(mm, KIND_MM, KIND_TEXT),
                      torch.tensor([KIND_TEXT] * 3 + [KIND_PAD] * 4 + [KIND_BOS, first_kind])])
    codec = [-1] * 3 + [cfg.codec_nothink_id, cfg.codec_think_bos_id, cfg.codec_think_eos_id,
                        int(host["talker_speaker"]), cfg.codec_pad_id, cfg.codec_bos_id]
    codec = torch.cat([torch.full((len(user),), -1), torch.tensor(codec)])
    return {"talker_text": text, "talker_kind": kind, "talker_codec": codec}


#: What the Talker's `GraphNode` reads (the prepare rule supplies all but `positions` on a
#: decode step, which the engine continues) and writes.
TALKER_INPUTS = ("input_ids", "positions", "talker_text", "talker_kind", "talker_codec",
                 "talker_decode", "talker_prev_hidden")
TALKER_PREFILL_OUTPUTS = ("token_ids", "talker_hidden", "talker_text_done")
TALKER_STEP_OUTPUTS = (*TALKER_PREFILL_OUTPUTS, "codes")


def talker_prepare(cfg: TalkerConfig) -> Callable[[Mapping[str, Any], int | None],
                                                  dict[str, Any]]:
    """The Talker's `GraphNode.prepare`: the invocation's inputs from its stream window
    (`text_rows`, `hidden_rows`, `stream_ended`), the host values (`talker_user_rows`,
    `talker_mm_mask`, `talker_assistant_start`, `talker_speaker`, optionally
    `talker_positions` [3, n] for a multimodal prompt) and the previous invocation's
    outputs. Before any (`talker_hidden` absent) it is the prefill: the prompt rows, ids
    `codec_pad_id` (a masked id, so penalties over the prompt ids change nothing). Else a
    decode step: the previous group-0 code and final hidden state, and the next text row:
    the window's, else (stream ended) `tts_eos` once, then `tts_pad`."""
    def prepare(env: Mapping[str, Any], iteration: int | None) -> dict[str, Any]:
        text_rows, hidden_rows = env["text_rows"], env["hidden_rows"]
        if env.get("talker_hidden") is None:
            rows = talker_prompt_rows(text_rows, hidden_rows, env, cfg)
            n = rows["talker_kind"].shape[0]
            return {**rows, "input_ids": torch.full((n,), cfg.codec_pad_id),
                    "positions": env.get("talker_positions"),
                    "talker_decode": torch.zeros(n, dtype=torch.long)}
        if text_rows.shape[0] > 1:
            raise ValueError(f"a Talker step takes one Thinker row, got {text_rows.shape[0]}")
        if text_rows.shape[0]:
            kind, text = KIND_TEXT, text_rows
        elif not env.get("stream_ended"):
            raise ValueError("an empty Talker window before the Thinker's stream ended")
        else:
            done = env.get("talker_text_done")
            kind = KIND_PAD if done is not None and bool(done.reshape(-1)[0]) else KIND_EOS
            text = text_rows.new_zeros(1, cfg.thinker_hidden_size)
        return {"input_ids": env["token_ids"].reshape(1), "positions": None,
                "talker_text": text, "talker_kind": torch.tensor([kind]),
                "talker_codec": torch.tensor([-1]), "talker_decode": torch.tensor([1]),
                "talker_prev_hidden": env["talker_hidden"].reshape(1, -1)}
    return prepare


def talker_walk(cfg: TalkerConfig) -> Sequential:
    """The Talker walk's body: the prefill invocation (no frame: the first group-0 code is
    drawn by its logits), then a loop of steps, each speaking the previous step's frame,
    until the codec end token (`finished`). Two `GraphNode`s of the one node, because the
    prefill must not list `codes` (the engine gives every listed output one row)."""
    prepare = talker_prepare(cfg)
    return Sequential(
        GraphNode("Talker", inputs=TALKER_INPUTS, outputs=TALKER_PREFILL_OUTPUTS,
                  prepare=prepare),
        Loop(GraphNode("Talker", inputs=TALKER_INPUTS, outputs=TALKER_STEP_OUTPUTS,
                       prepare=prepare), until="finished"))
