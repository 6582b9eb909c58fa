"""Pi0.5's node modules, built from `mstar.model.layers`, with lerobot 0.6.1's numbers.

- `VitEncoder` (stateless): PaliGemma's SigLIP tower and projector over every camera image
  of the step in one ragged batch.
- `Pi05LLM` (KV cache): two Gemma stacks sharing one set of attention layers. Expert 0 is
  PaliGemma's Gemma (prefix rows: image features and prompt tokens); expert 1 is the action
  expert (action rows), whose norms are adaptive (`AdaRMSNorm`, conditioned on the flow
  time) and whose residuals are gated. The stacks differ in width but share heads, KV heads
  and head_dim, so each projects into the same head space and attention is joint.
- `ActionInit`, `Combine` (stateless): the flow's noise and one Euler step.

Parameter names are lerobot's without their prefixes (`paligemma.` and `expert.` hold
Hugging Face Gemma names, `vision_model.` Hugging Face SigLIP names), so `WEIGHT_KEY_MAPS`
are plain renames.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model import ForwardBatch, StepContext
from mstar.model.experts import ExpertRouting
from mstar.model.layers import (
    ColumnParallelLinear,
    GatedMLP,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiglipConfig,
    SiglipVisionTransformer,
    VocabParallelEmbedding,
    heads_per_rank,
    pack_images,
)
from mstar.model.layers.embeddings import period_sincos
from mstar_pi05.config import GemmaSize, Pi05Config

Items = list[dict[str, Any]]

# ------------------------------------------------------------------------------------------
# Checkpoint keys (lerobot's `PI05Policy` state dict, with or without its leading `model.`)

_P = r"(?:model\.)?paligemma_with_expert\."
_PALIGEMMA = _P + r"paligemma\."
_EXPERT = _P + r"gemma_expert\."
_VISION_KEYS = _PALIGEMMA + r"model\.(?:vision_tower|multi_modal_projector)\..*"
_LLM_KEYS = (r"(?:model\.)?(?:action_in_proj|action_out_proj|(?:action_)?time_mlp_in"
             r"|(?:action_)?time_mlp_out)\..*")
#: The LLM's rule for checkpoints without PaliGemma's `embed_tokens` (those converted from
#: openpi store only the tied `lm_head`; lerobot copies it into the embedding when loading,
#: and a stored `embed_tokens` wins): put it before the LLM's map only then.
TIED_EMBEDDING: tuple[str, str] = (_PALIGEMMA + r"lm_head\.weight",
                                   "paligemma.embed_tokens.weight")
_OTHER_KEYS = (
    # the tied embedding (see TIED_EMBEDDING)
    (_PALIGEMMA + r"lm_head\.weight", None),
    # the prefix's hidden states are never read, only its K/V
    (_PALIGEMMA + r"model\.language_model\.norm\.weight", None),
    # the action expert embeds no tokens
    (_EXPERT + r"(?:lm_head|model\.embed_tokens)\.weight", None),
    # older checkpoints' plain expert norms and Pi0's state projection (lerobot skips both)
    (_EXPERT + r"model\.(?:layers\.\d+\.\w+_layernorm|norm)\.weight", None),
    (r"(?:model\.)?state_proj\..*", None),
)

#: Per node, `WeightSpec.key_map` rules from lerobot checkpoint keys to parameter names.
WEIGHT_KEY_MAPS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "vit_encoder": (
        (_PALIGEMMA + r"model\.vision_tower\.vision_model\.(.*)", r"vision_model.\1"),
        (_PALIGEMMA + r"model\.multi_modal_projector\.linear\.(.*)", r"projector.\1"),
        (_PALIGEMMA + r"model\.language_model\..*", None),
        (_EXPERT + r".*", None),
        (_LLM_KEYS, None),
        *_OTHER_KEYS,
    ),
    "LLM": (
        *_OTHER_KEYS,
        (_PALIGEMMA + r"model\.language_model\.((?:embed_tokens|layers)\..*)", r"paligemma.\1"),
        (_EXPERT + r"model\.((?:layers|norm)\..*)", r"expert.\1"),
        (r"(?:model\.)?(action_in_proj|action_out_proj)\.(.*)", r"\1.\2"),
        (r"(?:model\.)?(?:action_)?(time_mlp_in|time_mlp_out)\.(.*)", r"\1.\2"),
        (_VISION_KEYS, None),
    ),
    "action_init": ((r".*", None),),
    "combine": ((r".*", None),),
}


# ------------------------------------------------------------------------------------------
# Vision encoder


class VitEncoder(nn.Module):
    """items[i]["pixel_values"] [n_cam, 3, R, R] in [-1, 1] -> {"image_features":
    [n_cam · tokens_per_image, paligemma width]}, cameras in order. PaliGemma's projector
    output is used as is (transformers 5 no longer divides it by sqrt(width))."""

    def __init__(self, cfg: Pi05Config):
        super().__init__()
        v = cfg.vision
        self.siglip = SiglipConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
            image_size=cfg.image_resolution[0], patch_size=v.patch_size)
        self.vision_model = SiglipVisionTransformer(self.siglip)
        self.projector = nn.Linear(v.hidden_size, cfg.paligemma.width)

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        if not items:
            return []
        images = [image for item in items for image in item["pixel_values"]]
        patches, position_ids, lengths = pack_images(images, self.siglip.patch_size,
                                                     self.siglip.positions_per_side)
        features = self.projector(self.vision_model(patches, position_ids, lengths))
        per_item, first = [], 0
        for item in items:
            cams = len(item["pixel_values"])
            per_item.append(sum(lengths[first:first + cams]))
            first += cams
        return [{"image_features": f} for f in features.split(per_item)]


# ------------------------------------------------------------------------------------------
# The LLM: PaliGemma and the action expert over joint attention


class AdaRMSNorm(nn.Module):
    """Pi0.5's adaptive RMSNorm: `dense(cond)` gives (scale, shift, gate); the output is
    rmsnorm(x)·(1 + scale) + shift and `gate` scales the residual branch the norm feeds.
    Normalised in float32, as Gemma's norm."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cond_of_row: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, dim]; cond [M, cond_dim], row n conditioned on cond[cond_of_row[n]] (the
        modulation is computed once per condition, not per row) -> (y, gate), both [N, dim]."""
        modulation = self.dense(cond.to(self.dense.weight.dtype)).float()[cond_of_row]
        scale, shift, gate = modulation.chunk(3, dim=-1)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1 + scale) + shift).to(x.dtype), gate.to(x.dtype)


class _Attention(nn.Module):
    """One stack's q/k/v/o projections (Hugging Face names) into the shared head space."""

    def __init__(self, size: GemmaSize, tp: dict[str, Any]):
        super().__init__()
        q, kv = size.num_heads * size.head_dim, size.num_kv_heads * size.head_dim
        self.q_proj = ColumnParallelLinear(size.width, q, **tp)
        self.k_proj = ColumnParallelLinear(size.width, kv, **tp)
        self.v_proj = ColumnParallelLinear(size.width, kv, **tp)
        self.o_proj = RowParallelLinear(q, size.width, **tp)


class _Layer(nn.Module):
    """One Gemma decoder layer of one stack; adaptive norms when `cond_dim` is given."""

    def __init__(self, size: GemmaSize, eps: float, cond_dim: int | None, tp: dict[str, Any]):
        super().__init__()

        def norm() -> nn.Module:
            if cond_dim is None:
                return RMSNorm(size.width, eps, offset=1.0)
            return AdaRMSNorm(size.width, cond_dim, eps)

        self.input_layernorm = norm()
        self.self_attn = _Attention(size, tp)
        self.post_attention_layernorm = norm()
        self.mlp = GatedMLP(size.width, size.mlp_dim, act="gelu_tanh", **tp)


class _Stack(nn.Module):
    """A Gemma stack's layers (and, when adaptive, its final norm; when it reads tokens,
    its embedding)."""

    def __init__(self, size: GemmaSize, eps: float, *, vocab_size: int | None = None,
                 cond_dim: int | None = None, tp: dict[str, Any]):
        super().__init__()
        if vocab_size is not None:
            self.embed_tokens = VocabParallelEmbedding(vocab_size, size.width, **tp)
        self.layers = nn.ModuleList(_Layer(size, eps, cond_dim, tp) for _ in range(size.depth))
        if cond_dim is not None:
            self.norm = AdaRMSNorm(size.width, cond_dim, eps)


def _norm(norm: nn.Module, x: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor] | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normed x, residual gate or None) of a plain or adaptive norm."""
    return norm(x, *cond) if cond is not None else (norm(x), None)


def _residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    return x + y if gate is None else x + y * gate


class Pi05LLM(nn.Module):
    """The KV-cache node "LLM" (see the module docstring).

    Reads from `ForwardBatch.extras` (defaults as the KV spec declares): `expert_ids` [T]
    (0 prefix rows, 1 action rows); `is_image` [T] (1: the row is its `image_embeds` row,
    not a token embedding); `image_embeds` [T, paligemma width]; `x_t` [T, max_action_dim]
    (the action rows' noisy actions); `t` [B] (each sequence's flow time). Positions are
    1-D. Returns `velocity` [rows, max_action_dim] on `batch.output_rows("velocity")`.

    Embeddings as lerobot 0.6.1 (transformers 5) makes them: token embeddings times
    sqrt(width) in the weight dtype, image features as the encoder gives them.

    Tensor parallel: q/k/v/MLP column-, o/down row-parallel, the vocabulary split; the
    adaptive norms, time MLP and action projections are replicated. Each rank must hold
    whole KV heads, so with Pi0.5's one KV head only tp_size 1 builds (core's KV cache
    and `heads_per_rank` do not replicate KV heads).
    """

    def __init__(self, cfg: Pi05Config, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Any = None):
        super().__init__()
        self.cfg = cfg
        pg, ex = cfg.paligemma, cfg.action_expert
        if (pg.num_heads, pg.num_kv_heads, pg.head_dim, pg.depth) != (
                ex.num_heads, ex.num_kv_heads, ex.head_dim, ex.depth):
            raise ValueError(f"the PaliGemma stack {pg} and the action expert {ex} must share "
                             "depth, heads, KV heads and head_dim (their attention is joint)")
        self.heads, self.kv_heads = heads_per_rank(pg.num_heads, pg.num_kv_heads, tp_size)
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        eps = cfg.rms_norm_eps
        self.paligemma = _Stack(pg, eps, vocab_size=cfg.vocab_size, tp=tp)
        self.expert = _Stack(ex, eps, cond_dim=ex.width, tp=tp)
        self.attention = nn.ModuleList(PagedAttention(i, self.heads, self.kv_heads, pg.head_dim)
                                       for i in range(pg.depth))
        self.rotary = RotaryEmbedding(pg.head_dim, cfg.rope_theta)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, ex.width)
        self.action_out_proj = nn.Linear(ex.width, cfg.max_action_dim)
        self.time_mlp_in = nn.Linear(ex.width, ex.width)
        self.time_mlp_out = nn.Linear(ex.width, ex.width)

    # -- embeddings ----------------------------------------------------------------------
    def _embed_prefix(self, batch: ForwardBatch, rows: torch.Tensor) -> torch.Tensor:
        """Prefix rows: scaled token embeddings, or the image features at `is_image` rows."""
        embed = self.paligemma.embed_tokens
        ids = batch.input_ids[rows]
        is_image = batch.extras["is_image"][rows].bool() if "is_image" in batch.extras \
            else torch.zeros_like(ids, dtype=torch.bool)
        if not bool(is_image.any()):
            return self._scaled(embed(ids))
        x = torch.empty(ids.shape[0], self.cfg.paligemma.width, dtype=embed.weight.dtype,
                        device=ids.device)
        text = ~is_image
        if bool(text.any()):
            x[text] = self._scaled(embed(ids[text]))
        x[is_image] = batch.extras["image_embeds"][rows[is_image]].to(x.dtype)
        return x

    def _scaled(self, emb: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.cfg.paligemma.width ** 0.5, dtype=emb.dtype)
        return emb * scale.to(emb.device)

    def _embed_actions(self, batch: ForwardBatch, rows: torch.Tensor
                       ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Action rows: (action_in_proj(x_t), (the time condition of each sequence, the
        sequence of each row))."""
        dtype, device = self.action_in_proj.weight.dtype, rows.device
        x_t = batch.extras["x_t"][rows] if "x_t" in batch.extras else torch.zeros(
            rows.shape[0], self.cfg.max_action_dim, device=device)
        t = batch.extras["t"] if "t" in batch.extras else torch.zeros(len(batch.seqs),
                                                                       device=device)
        temb = period_sincos(t, self.cfg.action_expert.width, self.cfg.min_period,
                             self.cfg.max_period).to(dtype)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
        seq_of_row = torch.repeat_interleave(
            torch.arange(len(batch.seqs), device=device),
            torch.tensor([s.length for s in batch.seqs], device=device))
        return self.action_in_proj(x_t.to(dtype)), (cond, seq_of_row[rows])

    # -- forward ---------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        ids = batch.input_ids
        expert_ids = batch.extras.get("expert_ids")
        if expert_ids is None:
            expert_ids = torch.zeros_like(ids)
        route = ExpertRouting(expert_ids.to(device=ids.device, dtype=torch.long))
        h: dict[int, torch.Tensor] = {}
        cond: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {0: None}
        if route.counts[0]:
            h[0] = self._embed_prefix(batch, route.rows[0])
        if route.counts[1]:
            h[1], cond[1] = self._embed_actions(batch, route.rows[1])
        stacks = {0: self.paligemma, 1: self.expert}
        cos_sin = self.rotary.cos_sin(batch.positions)
        n_tok, head_dim = route.num_tokens, self.cfg.paligemma.head_dim
        last = len(self.attention) - 1
        for i, attention in enumerate(self.attention):
            q_parts, k_parts, v_parts, gates = {}, {}, {}, {}
            for e, x in h.items():
                layer = stacks[e].layers[i]
                xn, gates[e] = _norm(layer.input_layernorm, x, cond[e])
                proj = layer.self_attn
                q_parts[e], k_parts[e], v_parts[e] = proj.q_proj(xn), proj.k_proj(xn), \
                    proj.v_proj(xn)
            q = route.scatter(q_parts).view(n_tok, self.heads, head_dim)
            k = route.scatter(k_parts).view(n_tok, self.kv_heads, head_dim)
            v = route.scatter(v_parts).view(n_tok, self.kv_heads, head_dim)
            q, k = self.rotary.apply(q, k, cos_sin)
            o = attention(q, k, v).reshape(n_tok, self.heads * head_dim)
            if i == last:  # the prefix's last hidden states are never read: only its K/V
                h.pop(0, None)
            for e in h:
                layer = stacks[e].layers[i]
                x = _residual(h[e], layer.self_attn.o_proj(route.gather(o, e)),
                              gates[e])
                xn, gate = _norm(layer.post_attention_layernorm, x, cond[e])
                h[e] = _residual(x, layer.mlp(xn), gate)
        if not batch.wants("velocity"):
            return {}
        local = route.local(batch.output_rows("velocity"), 1, "velocity")
        cond_rows = cond[1]
        assert cond_rows is not None  # local() proved the expert has these rows
        y, _ = self.expert.norm(h[1][local], cond_rows[0], cond_rows[1][local])
        return {"velocity": self.action_out_proj(y.to(self.action_out_proj.weight.dtype))}


# ------------------------------------------------------------------------------------------
# Flow matching


class ActionInit(nn.Module):
    """Each item: `x_t` = its `noise` if given, else keyed Gaussian noise [action_horizon,
    max_action_dim] (site "noise": a core service, so independent of batching), and `t` = 1.
    `t` is float64 so that `Combine`'s repeated steps land on openpi's times 1 + k·dt
    exactly when the LLM reads them as float32."""

    def __init__(self, cfg: Pi05Config):
        super().__init__()
        self.shape = (cfg.action_horizon, cfg.max_action_dim)

    def forward(self, items: Items, ctx: StepContext) -> Items:
        out = []
        for i, item in enumerate(items):
            noise = item.get("noise")
            x = (ctx.randn(i, self.shape, site="noise") if noise is None
                 else torch.as_tensor(noise).to(device=ctx.device, dtype=torch.float32))
            out.append({"x_t": x, "t": torch.ones((), dtype=torch.float64, device=x.device)})
        return out


class Combine(nn.Module):
    """One Euler step of the flow from t=1 (noise) to t=0 (actions): dt = -1/num_steps,
    x_t <- x_t + dt·velocity, t <- t + dt."""

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        out = []
        for item in items:
            v = item["velocity"]
            dt = -1.0 / int(item["num_steps"])
            t = torch.as_tensor(item["t"], dtype=torch.float64, device=v.device)
            out.append({"x_t": item["x_t"] + dt * v.to(item["x_t"].dtype), "t": t + dt})
        return out
