"""V-JEPA 2's masked predictor: from a clip's latents at the context tokens, predict the
latents at the target tokens (which may lie outside the clip, e.g. future frames).

As `VJEPA2Model.predictor` computes it: the context latents are projected to the
predictor's width, each target token starts as the same learned mask token (index 1 of
`mask_tokens`, the reference's default `mask_index`), every token is rotated by its
position in the `crop_size` patch grid, all attend to all within their item, and the
targets' outputs are normed and projected back to the encoder's width. The reference
sorts tokens by position first; attention without a mask is order-free and RoPE depends
on positions, not order, so this does not.

Parameter names are the hub's `predictor.*` without the prefix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mstar.model import Segment, StepContext, ragged_attention
from mstar_vjepa2.config import VJepa2Config
from mstar_vjepa2.encoder import VJepa2Block
from mstar_vjepa2.rope import grid_positions

Items = list[dict[str, Any]]

#: The reference's default `mask_index` (`VJEPA2PredictorEmbeddings.forward`).
MASK_INDEX = 1

#: Per node, `WeightSpec.key_map` rules from hub checkpoint keys to parameter names.
WEIGHT_KEY_MAPS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "predictor": (
        (r"(?:vjepa2\.)?predictor\.(.*)", r"\1"),
        (r"(?:vjepa2\.)?encoder\..*", None),
        (r"(?:pooler|classifier)\..*", None),
    ),
}


class _Embeddings(nn.Module):
    def __init__(self, cfg: VJepa2Config):
        super().__init__()
        self.predictor_embeddings = nn.Linear(cfg.hidden_size, cfg.pred_hidden_size)
        self.mask_tokens = nn.Parameter(torch.zeros(cfg.pred_num_mask_tokens, 1, 1,
                                                    cfg.pred_hidden_size))


class MaskedPredictor(nn.Module):
    """items[i] {"latents": `[N, hidden]`, "context_ids": `[Nc]` long (indices into the
    latents), "target_ids": `[Nt]` long (indices into the clip's patch grid)} ->
    {"predictions": `[Nt, hidden]`}; a ragged batch over items."""

    def __init__(self, cfg: VJepa2Config):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.layer = nn.ModuleList(
            VJepa2Block(cfg.pred_hidden_size, cfg.pred_num_attention_heads, cfg.pred_mlp_ratio,
                        cfg, i)
            for i in range(cfg.pred_num_hidden_layers))
        self.layernorm = nn.LayerNorm(cfg.pred_hidden_size, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.pred_hidden_size, cfg.hidden_size)

    @staticmethod
    def _ids(item: dict[str, Any], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        context, target = item["context_ids"].long(), item["target_ids"].long()
        if context.dim() != 1 or target.dim() != 1 or target.numel() == 0:
            raise ValueError("context_ids and target_ids must be 1-D index tensors, "
                             "target_ids non-empty")
        if context.numel() and (context.min() < 0 or context.max() >= n):
            raise ValueError(f"context_ids must index the clip's {n} latents")
        if target.min() < 0:
            raise ValueError("target_ids must be non-negative patch-grid indices")
        return context, target

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        if not items:
            return []
        emb = self.embeddings
        mask_token = emb.mask_tokens[MASK_INDEX % self.cfg.pred_num_mask_tokens].view(1, -1)
        rows, ids, lengths, n_targets = [], [], [], []
        for item in items:
            latents = item["latents"]
            context, target = self._ids(item, latents.shape[0])
            context, target = context.to(latents.device), target.to(latents.device)
            rows.append(emb.predictor_embeddings(latents[context].to(mask_token.dtype)))
            rows.append(mask_token.expand(target.numel(), -1))
            ids += [context, target]
            lengths.append(context.numel() + target.numel())
            n_targets.append(target.numel())
        x = torch.cat(rows)
        grid = self.cfg.grid_size
        positions = grid_positions(torch.cat(ids), grid, grid)
        with ragged_attention([[Segment(n, "bidirectional")] for n in lengths],
                              device=x.device):
            for block in self.layer:
                x = block(x, positions)
        x = self.layernorm(x)
        return [{"predictions": self.proj(out[n - nt:])}
                for out, n, nt in zip(x.split(lengths), lengths, n_targets)]
