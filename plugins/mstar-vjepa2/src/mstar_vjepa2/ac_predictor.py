"""V-JEPA 2-AC's action-conditioned predictor as a KV-cache node.

The authors' predictor (`vit_ac_predictor`) reads T frames laid out as
[action_t, state_t, patches_t] per frame under a block-causal mask: a frame's tokens see
each other and every earlier frame. Here one frame is one chunk, one bidirectional segment
appended to its sequence: with earlier frames cached that IS the block-causal mask, so a
rollout appends one frame per step instead of recomputing the clip (the paper's speedup).
Predictions of a frame's patch rows are the next frame's latents.

A frame's chunk holds the action taken *from* that frame (and the state there), and its
patch rows attend to that action token: so the K/V of the current frame depend on the
action being tried. A rollout's or planner's first step therefore appends the current
frame with the first action; only the frames before it (with the actions already taken)
are a context that candidates can share by forking. With the authors' one-frame context
each CEM candidate's first chunk is the current frame itself.

RoPE as the authors' (`rope.rope_3d`, shared with the encoder). Action and state tokens
rotate by their frame only, which is rotating them at row = column = 0: so every row
carries 3 positions (frame, row, column) and one rotation serves all rows.

Parameter names are the authors' (`predictor_blocks.0.attn.qkv.weight`, ...), so the
checkpoint key map only strips the `predictor.` / `module.` / `backbone.` prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model import ForwardBatch
from mstar.model.forward import ExtraSpec, Segment
from mstar.model.layers import MLP, PagedAttention
from mstar_vjepa2.rope import rope_3d


@dataclass(frozen=True)
class ACPredictorConfig:
    """The authors' `vit_ac_predictor` arguments (`embed_dim`: the encoder's width)."""

    img_size: tuple[int, int] = (256, 256)
    patch_size: int = 16
    num_frames: int = 64
    tubelet_size: int = 2
    embed_dim: int = 1408
    predictor_embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    action_embed_dim: int = 7
    use_extrinsics: bool = False
    use_rope: bool = True
    is_frame_causal: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", (self.img_size, self.img_size))
        else:
            object.__setattr__(self, "img_size", tuple(self.img_size))
        if not self.is_frame_causal:
            raise ValueError("is_frame_causal=False lets a frame see later frames: a rollout "
                             "that appends frames to a cache cannot compute it")
        if self.predictor_embed_dim % self.num_heads:
            raise ValueError(f"predictor_embed_dim={self.predictor_embed_dim} is not a "
                             f"multiple of num_heads={self.num_heads}")
        if any(side % self.patch_size for side in self.img_size):
            raise ValueError(f"img_size={self.img_size} is not a multiple of "
                             f"patch_size={self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patch rows and columns of a frame."""
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def patches_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cond_tokens(self) -> int:
        """Tokens before a frame's patches: action, state (and extrinsics)."""
        return 3 if self.use_extrinsics else 2

    @property
    def tokens_per_frame(self) -> int:
        return self.cond_tokens + self.patches_per_frame

    @property
    def max_frames(self) -> int:
        """Frames one sequence may hold: the authors' mask covers num_frames/tubelet."""
        return self.num_frames // self.tubelet_size

    @property
    def head_dim(self) -> int:
        return self.predictor_embed_dim // self.num_heads


#: Preset name -> ACPredictorConfig overrides. tiny/small match the encoder presets' widths
#: (config.py's hidden_size); `vitg` is the released vjepa2-ac-vitg.
PRESETS: dict[str, dict[str, Any]] = {
    # head_dim 16: three RoPE slices of 4, 4 dims unrotated
    "tiny": dict(img_size=(32, 32), patch_size=8, num_frames=16, embed_dim=32,
                 predictor_embed_dim=64, depth=2, num_heads=4),
    "small": dict(img_size=(64, 64), patch_size=8, num_frames=32, embed_dim=128,
                  predictor_embed_dim=128, depth=4, num_heads=4),
    "vitg": {},
}

# -- the engine contract ------------------------------------------------------------------

#: Row kinds of a frame chunk (`token_kind`).
PATCH, ACTION, STATE, EXTRINSICS = 0, 1, 2, 3
#: Position axes of every row: frame, patch row, patch column.
POSITION_AXES = 3


def kv_extras(cfg: ACPredictorConfig) -> tuple[ExtraSpec, ...]:
    """Per-token extras of a frame chunk: each row's kind, the encoder latents of patch
    rows, the action / state (/ extrinsics, first 6 values) vector of conditioning rows."""
    return (ExtraSpec("token_kind", "token", (), torch.long, PATCH),
            ExtraSpec("latents", "token", (cfg.embed_dim,)),
            ExtraSpec("cond", "token", (cfg.action_embed_dim,)))


#: Outputs: `next_latents` on every row of the frame chunk (its only segment);
#: `next_frame` keeps the patch rows: the next frame's predicted latents.
KV_OUTPUTS: dict[str, str] = {"next_latents": "segment:-1"}


def frame_inputs(latents: torch.Tensor, action: torch.Tensor, state: torch.Tensor,
                 frame_index: int, cfg: ACPredictorConfig,
                 extrinsics: torch.Tensor | None = None) -> dict[str, Any]:
    """One frame chunk: `latents` [patches_per_frame, embed_dim] (the frame's encoder
    latents, or the previous step's prediction), `action` / `state` [action_embed_dim] ->
    input_ids (placeholders), positions [3, n], segments, extras."""
    p, d = cfg.patches_per_frame, cfg.embed_dim
    if tuple(latents.shape) != (p, d):
        raise ValueError(f"a frame's latents must be [{p}, {d}], got {list(latents.shape)}")
    if not 0 <= frame_index < cfg.max_frames:
        raise ValueError(f"frame {frame_index} is outside the predictor's "
                         f"{cfg.max_frames} frames")
    if cfg.use_extrinsics and extrinsics is None:
        raise ValueError("this predictor is conditioned on extrinsics: give them")
    conds = [action, state] + ([extrinsics] if cfg.use_extrinsics else [])
    rows = []
    for name, v in zip(("action", "state", "extrinsics"), conds):
        v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
        want = cfg.action_embed_dim - (name == "extrinsics")
        if v.numel() != want:
            raise ValueError(f"{name} must have {want} values, got {v.numel()}")
        rows.append(F.pad(v, (0, cfg.action_embed_dim - want)))
    k, n = cfg.cond_tokens, cfg.tokens_per_frame
    gh, gw = cfg.grid
    positions = torch.zeros(POSITION_AXES, n, dtype=torch.long)
    positions[0] = frame_index
    positions[1, k:] = torch.arange(gh).repeat_interleave(gw)
    positions[2, k:] = torch.arange(gw).repeat(gh)
    cond = torch.zeros(n, cfg.action_embed_dim)
    cond[:k] = torch.stack(rows)
    return {
        "input_ids": torch.zeros(n, dtype=torch.long),
        "positions": positions,
        "segments": [Segment(n, "bidirectional")],
        "extras": {
            "token_kind": torch.tensor([ACTION, STATE, EXTRINSICS][:k] + [PATCH] * p),
            "latents": torch.cat([torch.zeros(k, d), latents.float().cpu()]),
            "cond": cond,
        },
    }


def next_frame(next_latents: torch.Tensor, cfg: ACPredictorConfig) -> torch.Tensor:
    """A frame chunk's `next_latents` rows -> its patch rows [patches_per_frame,
    embed_dim]: the next frame's predicted latents (the authors' output)."""
    return next_latents[cfg.cond_tokens:]


# -- checkpoint keys ------------------------------------------------------------------------

#: `WeightSpec.key_map` rules from the authors' pickled dict ({"encoder": ..., "predictor":
#: ...}, flattened by core's loader to `predictor.module.backbone.<name>`) to parameters.
WEIGHT_KEY_MAPS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "ac_predictor": (
        (r"predictor\.(?:module\.)?(?:backbone\.)?(.*)", r"\1"),
        (r".*", None),
    ),
}


# -- the module -----------------------------------------------------------------------------


class _Attention(nn.Module):
    """The authors' fused qkv and output projection."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class _Block(nn.Module):
    def __init__(self, cfg: ACPredictorConfig):
        super().__init__()
        dim = cfg.predictor_embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = _Attention(dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = MLP(dim, int(dim * cfg.mlp_ratio), act="gelu")


class ACPredictor(nn.Module):
    """The KV node `ac_predictor` (module docstring). Reads `kv_extras(cfg)` and positions
    [3, T] as `frame_inputs` builds them; returns `next_latents` [rows, embed_dim] on
    `batch.output_rows("next_latents")` (the patch rows' values are the predictions)."""

    def __init__(self, cfg: ACPredictorConfig):
        super().__init__()
        self.cfg = cfg
        dim, a = cfg.predictor_embed_dim, cfg.action_embed_dim
        self.predictor_embed = nn.Linear(cfg.embed_dim, dim)
        self.action_encoder = nn.Linear(a, dim)
        self.state_encoder = nn.Linear(a, dim)
        self.extrinsics_encoder = nn.Linear(a - 1, dim)  # built (and stored) either way
        self.predictor_blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.attention = nn.ModuleList(
            PagedAttention(i, cfg.num_heads, cfg.num_heads, cfg.head_dim)
            for i in range(cfg.depth))
        self.predictor_norm = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.predictor_proj = nn.Linear(dim, cfg.embed_dim)

    def _embed(self, batch: ForwardBatch) -> torch.Tensor:
        """Each row through its kind's input layer. Every layer runs on every row and
        `where` picks (the conditioning layers are 7 wide: cheap), so no row selection
        waits on the device."""
        ex = batch.extras
        w = self.predictor_embed.weight
        kind = ex["token_kind"].to(device=w.device, dtype=torch.long)[:, None]
        cond = ex["cond"].to(w.dtype)
        x = self.predictor_embed(ex["latents"].to(w.dtype))
        x = torch.where(kind == ACTION, self.action_encoder(cond), x)
        x = torch.where(kind == STATE, self.state_encoder(cond), x)
        if self.cfg.use_extrinsics:
            x = torch.where(kind == EXTRINSICS, self.extrinsics_encoder(cond[:, :-1]), x)
        return x

    def _rope(self, t: torch.Tensor, pos: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return rope_3d(t, *pos) if self.cfg.use_rope else t

    def forward(self, batch: ForwardBatch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        gh, gw = cfg.grid
        positions = batch.positions.to(torch.float32)
        # the authors snap columns to the row grid (a no-op for square frames)
        pos = (positions[0], positions[1], positions[2] * (gh / gw))
        x = self._embed(batch)
        n_tok, heads, hd = batch.num_tokens, cfg.num_heads, cfg.head_dim
        for block, attention in zip(self.predictor_blocks, self.attention):
            q, k, v = block.attn.qkv(block.norm1(x)).view(n_tok, 3, heads, hd).unbind(1)
            o = attention(self._rope(q, pos), self._rope(k, pos), v)
            x = x + block.attn.proj(o.reshape(n_tok, heads * hd))
            x = x + block.mlp(block.norm2(x))
        if not batch.wants("next_latents"):
            return {}
        rows = batch.output_rows("next_latents")
        return {"next_latents": self.predictor_proj(self.predictor_norm(x[rows]))}
