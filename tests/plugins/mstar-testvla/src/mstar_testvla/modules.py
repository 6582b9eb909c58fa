"""TestVLA's node modules, built from `mstar.model.layers`.

- `VisionEncoder` (stateless): a one-block ViT run as ONE cache-less ragged batch over every
  image of the step (each image a bidirectional segment, no padding).
- `TestVLALLM` (KV cache): a two-expert mixture-of-transformers. Expert 0 is exactly Llama
  (text and frame tokens); expert 1 is a half-width stack (image and action tokens). Each
  expert runs its own norms and projections on its own rows; attention is joint over all
  tokens, so both experts read and write the same KV layers.
- `ActionInit`, `Combine` (stateless): flow-matching noise and the Euler/CFG update.
- `CEMSample`, `CEMRefit` (stateless): the cross-entropy method's candidate actions and
  its top-k refit, the join of the `plan` walk's children.
- `Consumer` (stateless): a codec-like decoder of (code, hidden) units into audio samples,
  fed by a streaming edge window by window.

Stateless nodes take `forward(items, ctx)`: one dict of named tensors per request, and
return one dict per item.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model import ForwardBatch, Segment, StepContext, ragged_attention
from mstar.model.experts import ExpertRouting
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
from mstar_testvla.config import TestVLAConfig
from mstar_testvla.tokenizer import ACT, FRAME, IMG

Items = list[dict[str, Any]]


# ------------------------------------------------------------------------------------------
# Vision encoder


def patchify(pixel_values: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[3, H, W] -> row-major patches [gh * gw, 3 * patch²] (channel, row, col inside a
    patch), and the grid (gh, gw)."""
    c, h, w = pixel_values.shape
    if c != 3 or h % patch or w % patch:
        raise ValueError(f"pixel_values must be [3, H, W] with H, W multiples of {patch}, "
                         f"got {list(pixel_values.shape)}")
    gh, gw = h // patch, w // patch
    x = pixel_values.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4)
    return x.reshape(gh * gw, c * patch * patch), (gh, gw)


def sincos_2d(grid: tuple[int, int], dim: int, device: torch.device | None = None
              ) -> torch.Tensor:
    """Fixed 2-D position embedding [gh * gw, dim]: [sin, cos] of the row, then of the
    column, each over dim/4 frequencies 10000^(-k / (dim/4))."""
    gh, gw = grid
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    rows = torch.arange(gh, device=device).repeat_interleave(gw).float()
    cols = torch.arange(gw, device=device).repeat(gh).float()

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None] * omega
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    return torch.cat([axis(rows), axis(cols)], dim=-1)


class _VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.attn = PagedAttention(0, heads, heads, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0], self.heads, self.head_dim)
        q, k, v = (p(x).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(self.attn(q, k, v).reshape(x.shape[0], -1))


class _VisionMLP(nn.Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inter), nn.Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _VisionBlock(nn.Module):
    def __init__(self, cfg: TestVLAConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.vision_hidden, cfg.rms_norm_eps)
        self.attn = _VisionAttention(cfg.vision_hidden, cfg.vision_heads)
        self.norm2 = RMSNorm(cfg.vision_hidden, cfg.rms_norm_eps)
        self.mlp = _VisionMLP(cfg.vision_hidden, cfg.vision_intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """items[i]["pixel_values"] [3, H, W] -> {"image_features": [H/p * W/p, expert_hidden]}.

    Parameters are named like the checkpoint without its `vision_model.` prefix."""

    def __init__(self, cfg: TestVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.vision_hidden)
        self.block = _VisionBlock(cfg)
        self.post_norm = RMSNorm(cfg.vision_hidden, cfg.rms_norm_eps)
        self.connector = nn.Linear(cfg.vision_hidden, cfg.expert_hidden)

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        if not items:
            return []
        embedded, lengths = [], []
        for item in items:
            pixels = item["pixel_values"].to(self.patch_embed.weight.dtype)
            patches, grid = patchify(pixels, self.cfg.patch_size)
            pos = sincos_2d(grid, self.cfg.vision_hidden, pixels.device).to(pixels.dtype)
            embedded.append(self.patch_embed(patches) + pos)
            lengths.append(patches.shape[0])
        x = torch.cat(embedded)
        with ragged_attention([[Segment(n, "bidirectional")] for n in lengths],
                              device=x.device):
            x = self.block(x)
        feats = self.connector(self.post_norm(x))
        return [{"image_features": f} for f in feats.split(lengths)]


# ------------------------------------------------------------------------------------------
# The LLM: two experts over joint attention


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of flow times t [N] in [0, 1]: [sin, cos] of
    1000·t·10000^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                        device=t.device) / half)
    angle = 1000.0 * t.float()[:, None] * freqs
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class _Attention(nn.Module):
    """`self_attn` of one layer: both experts' projections (`*_moe_gen` is expert 1)."""

    def __init__(self, cfg: TestVLAConfig, layer_idx: int, tp: dict[str, Any]):
        super().__init__()
        self.heads, self.kv_heads = heads_per_rank(cfg.num_attention_heads,
                                                   cfg.num_key_value_heads, tp["tp_size"])
        self.head_dim = cfg.head_dim
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        for suffix, width in (("", cfg.hidden_size), ("_moe_gen", cfg.expert_hidden)):
            setattr(self, f"q_proj{suffix}", ColumnParallelLinear(width, q, **tp))
            setattr(self, f"k_proj{suffix}", ColumnParallelLinear(width, kv, **tp))
            setattr(self, f"v_proj{suffix}", ColumnParallelLinear(width, kv, **tp))
            setattr(self, f"o_proj{suffix}", RowParallelLinear(q, width, **tp))
        self.attn = PagedAttention(layer_idx, self.heads, self.kv_heads, cfg.head_dim)

    def projections(self, expert: int) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
        s = "_moe_gen" if expert else ""
        return (getattr(self, f"q_proj{s}"), getattr(self, f"k_proj{s}"),
                getattr(self, f"v_proj{s}"), getattr(self, f"o_proj{s}"))


class _Layer(nn.Module):
    def __init__(self, cfg: TestVLAConfig, layer_idx: int, tp: dict[str, Any]):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = _Attention(cfg, layer_idx, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, **tp)
        self.mlp_moe_gen = GatedMLP(cfg.expert_hidden, cfg.expert_intermediate, **tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.input_layernorm_moe_gen = RMSNorm(cfg.expert_hidden, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(cfg.expert_hidden, eps)

    def expert(self, e: int) -> tuple[nn.Module, nn.Module, nn.Module]:
        """(input norm, post-attention norm, MLP) of expert `e`."""
        if e == 0:
            return self.input_layernorm, self.post_attention_layernorm, self.mlp
        return (self.input_layernorm_moe_gen, self.post_attention_layernorm_moe_gen,
                self.mlp_moe_gen)


class _Backbone(nn.Module):
    """`model.*` of the checkpoint."""

    def __init__(self, cfg: TestVLAConfig, tp: dict[str, Any]):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, **tp)
        self.layers = nn.ModuleList(_Layer(cfg, i, tp) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.expert_hidden, cfg.rms_norm_eps)


class TestVLALLM(nn.Module):
    """The KV-cache node "LLM" (see the module docstring).

    Reads from `ForwardBatch.extras` (all optional, defaults as declared in the KV spec):
    `expert_ids` [T] long; `media_embeds` [T, expert_hidden] (rows of IMG tokens);
    `x_t` [T, action_dim] (rows of ACT tokens); `t` [B] (flow time of each sequence);
    `frame_embeds` [T, frame_dim] (rows of FRAME tokens). Positions are [3, T] (t, h, w) or
    [T]. Returns the named outputs the batch asks for, each only on its
    `batch.output_rows(name)`: `logits`, `mid_hidden`, `frame_pred` (expert 0) and
    `velocity` (expert 1).
    """

    __test__ = False

    def __init__(self, cfg: TestVLAConfig, *, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Any = None):
        super().__init__()
        self.cfg = cfg
        tp = dict(tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        self.model = _Backbone(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, **tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, sections=cfg.mrope_sections)
        eh = cfg.expert_hidden
        self.action_in_proj = nn.Linear(cfg.action_dim, eh)
        self.time_mlp_in = nn.Linear(eh, eh)
        self.time_mlp_out = nn.Linear(eh, eh)
        self.action_out_proj = nn.Linear(eh, cfg.action_dim)
        self.frame_in_proj = nn.Linear(cfg.frame_dim, cfg.hidden_size)
        self.frame_out_proj = nn.Linear(cfg.hidden_size, cfg.frame_dim)

    # -- embeddings ----------------------------------------------------------------------
    @staticmethod
    def _extra(batch: ForwardBatch, name: str, rows: torch.Tensor, width: int) -> torch.Tensor:
        """Per-token extra `name` at `rows`; zeros (its declared default) when absent."""
        if name in batch.extras:
            return batch.extras[name][rows]
        return torch.zeros(rows.shape[0], width, device=rows.device)

    def _embed_text(self, batch: ForwardBatch, rows: torch.Tensor, ids: torch.Tensor
                    ) -> torch.Tensor:
        x = self.model.embed_tokens(ids)
        is_frame = ids == FRAME
        if bool(is_frame.any()):
            frames = self._extra(batch, "frame_embeds", rows[is_frame], self.cfg.frame_dim)
            x = x.clone()
            x[is_frame] = self.frame_in_proj(frames.to(x.dtype))
        return x

    def _embed_media(self, batch: ForwardBatch, rows: torch.Tensor, ids: torch.Tensor
                     ) -> torch.Tensor:
        is_img, is_act = ids == IMG, ids == ACT
        if not bool((is_img | is_act).all()):
            raise ValueError(f"expert-1 tokens must be IMG ({IMG}) or ACT ({ACT}) "
                             f"placeholders, got ids {ids[~(is_img | is_act)].unique().tolist()}")
        dtype = self.action_in_proj.weight.dtype
        x = torch.empty(ids.shape[0], self.cfg.expert_hidden, dtype=dtype, device=ids.device)
        if bool(is_img.any()):
            x[is_img] = self._extra(batch, "media_embeds", rows[is_img],
                                    self.cfg.expert_hidden).to(dtype)
        if bool(is_act.any()):
            act_rows = rows[is_act]
            actions = self._extra(batch, "x_t", act_rows, self.cfg.action_dim).to(dtype)
            seq_of_row = torch.repeat_interleave(
                torch.arange(len(batch.seqs), device=ids.device),
                torch.tensor([s.length for s in batch.seqs], device=ids.device))
            t = batch.extras["t"][seq_of_row[act_rows]] if "t" in batch.extras else \
                torch.zeros(act_rows.shape[0], device=ids.device)
            temb = timestep_embedding(t, self.cfg.expert_hidden).to(dtype)
            x[is_act] = self.action_in_proj(actions) + self.time_mlp_out(
                F.silu(self.time_mlp_in(temb)))
        return x

    # -- forward ---------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        ids = batch.input_ids
        expert_ids = batch.extras.get("expert_ids")
        if expert_ids is None:
            expert_ids = torch.zeros_like(ids)
        route = ExpertRouting(expert_ids.to(device=ids.device, dtype=torch.long))
        h: dict[int, torch.Tensor] = {}
        for e in route.present():
            rows = route.rows[e]
            embed = self._embed_text if e == 0 else self._embed_media
            h[e] = embed(batch, rows, route.gather(ids, e))
        cos_sin = self.rotary.cos_sin(batch.positions)
        mid: torch.Tensor | None = None
        want_mid = batch.wants("mid_hidden")
        n_tok = route.num_tokens
        for i, layer in enumerate(self.model.layers):
            if want_mid and i == self.cfg.mid_layer:
                mid = h.get(0)
            attn = layer.self_attn
            q_parts, k_parts, v_parts = {}, {}, {}
            for e, x in h.items():
                q_proj, k_proj, v_proj, _ = attn.projections(e)
                xn = layer.expert(e)[0](x)
                q_parts[e], k_parts[e], v_parts[e] = q_proj(xn), k_proj(xn), v_proj(xn)
            q = route.scatter(q_parts).view(n_tok, attn.heads, attn.head_dim)
            k = route.scatter(k_parts).view(n_tok, attn.kv_heads, attn.head_dim)
            v = route.scatter(v_parts).view(n_tok, attn.kv_heads, attn.head_dim)
            q, k = self.rotary.apply(q, k, cos_sin)
            o = attn.attn(q, k, v).reshape(n_tok, attn.heads * attn.head_dim)
            for e in h:
                _, post_norm, mlp = layer.expert(e)
                x = h[e] + attn.projections(e)[3](route.gather(o, e))
                h[e] = x + mlp(post_norm(x))
        if want_mid and self.cfg.mid_layer == len(self.model.layers):
            mid = h.get(0)
        return self._outputs(batch, route, h, mid)

    def _outputs(self, batch: ForwardBatch, route: ExpertRouting, h: dict[int, torch.Tensor],
                 mid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        heads = {
            "logits": (0, lambda x: self.lm_head(self.model.norm(x))),
            "frame_pred": (0, lambda x: self.frame_out_proj(self.model.norm(x))),
            "velocity": (1, lambda x: self.action_out_proj(self.model.norm_moe_gen(x))),
            "mid_hidden": (0, lambda x: x),
        }
        out: dict[str, torch.Tensor] = {}
        for name, (e, head) in heads.items():
            if not batch.wants(name):
                continue
            local = route.local(batch.output_rows(name), e, name)
            source = mid if name == "mid_hidden" else h.get(e)
            assert source is not None  # local() proved expert e has these rows
            out[name] = head(source[local])
        return out


# ------------------------------------------------------------------------------------------
# Flow matching


class ActionInit(nn.Module):
    """Each item: `x_t` = keyed Gaussian noise [action_horizon, action_dim] (site "noise"),
    `t` = 1. Noise is a core service (`ctx.randn`), so it does not depend on batching."""

    def __init__(self, cfg: TestVLAConfig):
        super().__init__()
        self.shape = (cfg.action_horizon, cfg.action_dim)

    def forward(self, items: Items, ctx: StepContext) -> Items:
        out = []
        for i in range(len(items)):
            x = ctx.randn(i, self.shape, site="noise")
            out.append({"x_t": x, "t": torch.ones((), dtype=x.dtype, device=x.device)})
        return out


class Combine(nn.Module):
    """One Euler step of flow matching from t=1 (noise) to t=0, with classifier-free
    guidance when the unconditional branch ran:
    v = v_u + s·(v_c − v_u); x ← x − v/num_steps; t ← t − 1/num_steps."""

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        out = []
        for item in items:
            v = item["velocity"]
            if item.get("velocity_uncond") is not None:
                s = float(item.get("guidance_scale", 1.0))
                v = item["velocity_uncond"] + s * (v - item["velocity_uncond"])
            dt = -1.0 / int(item["num_steps"])
            t = torch.as_tensor(item["t"], dtype=v.dtype, device=v.device)
            out.append({"x_t": item["x_t"] + dt * v, "t": t + dt})
        return out


class CEMSample(nn.Module):
    """Each item: `actions` = `mean` + `std` · keyed Gaussian noise (site "cem"), of
    `mean`'s shape [horizon, frame_dim]. Each candidate (child) and each CEM round draws
    its own noise: `ctx.randn` keys it by child and join round."""

    def forward(self, items: Items, ctx: StepContext) -> Items:
        out = []
        for i, item in enumerate(items):
            mean = torch.as_tensor(item["mean"], dtype=torch.float32, device=ctx.device)
            std = torch.as_tensor(item["std"], dtype=torch.float32, device=ctx.device)
            out.append({"actions": mean + std * ctx.randn(i, tuple(mean.shape), site="cem")})
        return out


class CEMRefit(nn.Module):
    """The join of a CEM round, over every candidate at once: `actions` [N, horizon, dim]
    and each candidate's final predicted frame `frame_pred` [N, frame_tokens, dim] in; the
    score of a candidate is the mean L1 distance of its frame to `goal`; the `plan_topk`
    lowest (ties to the lower child) refit `mean` and `std` (population std); `score` is
    the best candidate's."""

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        out = []
        for item in items:
            actions, frames = item["actions"], item["frame_pred"]
            goal = torch.as_tensor(item["goal"], dtype=frames.dtype, device=frames.device)
            scores = (frames - goal).abs().mean(dim=(1, 2))
            order = torch.argsort(scores, stable=True)[:int(item["plan_topk"])]
            elite = actions[order]
            out.append({"mean": elite.mean(0), "std": elite.std(0, correction=0),
                        "score": scores[order[0]]})
        return out


# ------------------------------------------------------------------------------------------
# Consumer


class Consumer(nn.Module):
    """Codec-like decoder: units (code id, LLM hidden) [L] -> `wave` [L·samples_per_unit].

    e = code_embed(codes) + hidden_proj(hidden); the conv (zero-padded at the window's
    edges) runs twice, so each unit's samples depend on two neighbours each side and a
    streamed window's edges change them, as in a real codec decoding windows; then
    tanh(out(·)) per unit. `consumer_delay_s` (a request value, default 0) makes each call
    sleep that long: test instrumentation for backpressure, not a model feature.
    Parameters are named like the checkpoint without its `consumer.` prefix.
    """

    def __init__(self, cfg: TestVLAConfig):
        super().__init__()
        self.code_embed = nn.Embedding(cfg.vocab_size, cfg.code_dim)
        self.hidden_proj = nn.Linear(cfg.hidden_size, cfg.code_dim)
        self.conv = nn.Conv1d(cfg.code_dim, cfg.code_dim, cfg.consumer_kernel,
                              padding=cfg.consumer_kernel // 2)
        self.out = nn.Linear(cfg.code_dim, cfg.samples_per_unit)

    def decode(self, codes: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """One window: codes [L], hidden [L, hidden_size] -> samples [L·samples_per_unit]."""
        e = self.code_embed(codes.long()) + self.hidden_proj(hidden.to(self.out.weight.dtype))
        x = e.T.unsqueeze(0)
        x = self.conv(F.silu(self.conv(x)))
        return torch.tanh(self.out(x[0].T)).reshape(-1)

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        delay = max((float(item.get("consumer_delay_s") or 0.0) for item in items), default=0.0)
        if delay > 0:
            time.sleep(delay)
        return [{"wave": self.decode(item["codes"], item["hidden"])} for item in items]
