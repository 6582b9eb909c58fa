"""BAGEL's understanding encoder: images -> LLM-width embeddings of their patches.

As the authors' `forward_cache_update_vit` computes `packed_vit_token_embed`: a navit
SigLIP tower over the images packed ragged (each patch's learned position by its flattened
id `row * side + col`, `side = vit_max_num_patch_per_side`; post-layernorm included), then
`connector` (fc1 to the LLM width, `gelu_pytorch_tanh`, fc2), then `+ vit_pos_embed` (the
fixed 2-D sine-cosine table over the same ids).

Parameter names are ema.safetensors' (`vit_model.vision_model.*`, `connector.*`,
`vit_pos_embed.pos_embed`): no rename beyond the lead's prefix rules. The patch embedding is
stored flat (`[hidden, 14·14·3]`, (row, col, channel) order): BAGEL converted the conv to a
linear layer before training (`convert_conv2d_to_linear`).

Two deliberate differences from the authors' run: attention runs in the module's dtype
(their flash-attn call casts q/k/v to bfloat16), and the tower's position table must have
the same side as `vit_max_num_patch_per_side` (theirs indexes it with ids of that side
whatever its size; the released configs have 980/14 = 70 on both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mstar.model import config_from_fields
from mstar.model.layers import MLP, PositionTable, SiglipConfig, SiglipVisionTransformer
from mstar.model.layers.vision import pack_images


@dataclass(frozen=True)
class ViTConfig(SiglipConfig):
    """BAGEL's SigLIP tower, as it runs (the layer count already reduced)."""

    @classmethod
    def from_vit_config_json(cls, fields: Mapping[str, Any]) -> ViTConfig:
        """From the checkpoint's `vit_config.json`. Every authors' loader (app.py,
        eval/*, train/*) drops the tower's last layer (`num_hidden_layers -= 1`, and
        `rope = False`: learned positions), so ema.safetensors holds 26 of its 27."""
        return config_from_fields(cls, fields,
                                  num_hidden_layers=fields["num_hidden_layers"] - 1)


#: `bagel-7b` is BAGEL-7B-MoT's vit_config.json read by `from_vit_config_json`; `tiny` is for
#: tests (4 × 4 patches of 7 pixels at most per side).
VIT_PRESETS: dict[str, ViTConfig] = {
    "bagel-7b": ViTConfig.from_vit_config_json(dict(
        hidden_size=1152, image_size=980, intermediate_size=4304, num_attention_heads=16,
        num_hidden_layers=27, patch_size=14)),
    "tiny": ViTConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, image_size=28, patch_size=7),
}


class BagelViT(nn.Module):
    """Images [3, H, W] (normalised by `transforms.vit_transform`; H, W multiples of the
    patch size) -> (packed embeddings [sum of patches, llm_hidden], patches per image)."""

    def __init__(self, vit_cfg: SiglipConfig, llm_hidden: int, max_patches_per_side: int,
                 *, connector_act: str = "gelu_pytorch_tanh", dtype: torch.dtype | None = None):
        super().__init__()
        if vit_cfg.positions_per_side != max_patches_per_side:
            raise ValueError(
                f"the ViT's position table has {vit_cfg.positions_per_side} cells a side "
                f"(image_size {vit_cfg.image_size} / patch {vit_cfg.patch_size}), but "
                f"vit_max_num_patch_per_side is {max_patches_per_side}: BAGEL indexes both "
                "tables with the same flattened ids")
        self.cfg, self.side = vit_cfg, max_patches_per_side
        self.vit_model = nn.ModuleDict({"vision_model": SiglipVisionTransformer(
            vit_cfg, flat_patch_weight=True, dtype=dtype)})
        self.connector = MLP(vit_cfg.hidden_size, llm_hidden, llm_hidden, act=connector_act,
                             dtype=dtype)
        self.vit_pos_embed = PositionTable(max_patches_per_side, llm_hidden)

    def forward(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        patches, ids, lengths = pack_images(images, self.cfg.patch_size, self.side)
        x = self.vit_model["vision_model"](patches, ids, lengths)
        return self.connector(x) + self.vit_pos_embed(ids).to(x.dtype), lengths
