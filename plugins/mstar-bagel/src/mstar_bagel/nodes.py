"""BAGEL's graph nodes as the runtime runs them: each stateless node takes a batch of items
(one per request invocation) and returns one output dict per item; the LLM is the KV node.
Where each node's weights live in the checkpoint (`weight_spec`) is here too.

`ema.safetensors` holds the LLM, the ViT and their adapters; `ae.safetensors` the VAE.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mstar.model import BuildContext, StepContext
from mstar.model.layers.embeddings import unpatchify
from mstar.weights import WeightSpec
from mstar_bagel.autoencoder import VAEDecoderNode, VAEEncoderNode, vae_weight_spec
from mstar_bagel.config import BagelConfig
from mstar_bagel.llm import BagelLLM, llm_key_map
from mstar_bagel.vit import BagelViT

Items = list[dict[str, Any]]
EMA_FILE = "ema.safetensors"


class ViTNode(BagelViT):
    """`vit_encoder`: each item's `pixel_values` [3, H, W] -> `vit_features` [patches,
    LLM hidden]. Every item of the batch runs in one packed forward."""

    def __init__(self, config: BagelConfig):
        super().__init__(config.vit, config.llm.hidden_size, config.vit_max_num_patch_per_side,
                         connector_act=config.connector_act)

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:  # type: ignore[override]
        if not items:
            return []
        dtype = self.connector.fc1.weight.dtype
        packed, lengths = super().forward([item["pixel_values"].to(dtype) for item in items])
        return [{"vit_features": f} for f in packed.split(lengths)]


class VAEEncoderItems(VAEEncoderNode):
    """`vae_encoder`: each item's `pixel_values` [3, H, W] -> `vae_latent` [z, H/d, W/d], a
    draw of the encoder's Gaussian as BAGEL conditions on (keyed noise, site "vae")."""

    def __init__(self, config: BagelConfig):
        super().__init__(config.vae)

    def forward(self, items: Items, ctx: StepContext) -> Items:
        out = []
        d, z = self.config.downsample, self.config.z_channels
        for i, item in enumerate(items):
            pixels = item["pixel_values"].to(self.encoder.conv_in.weight.dtype)[None]
            shape = (1, z, pixels.shape[2] // d, pixels.shape[3] // d)
            noise = ctx.randn(i, shape, "vae").to(pixels.dtype)
            out.append({"vae_latent": self.encode(pixels, noise)[0]})
        return out


class VAEDecoderItems(VAEDecoderNode):
    """`vae_decoder`: each item's final latent tokens `x_t` [h·w, p·p·z] on its
    `latent_grid` (h, w) -> `image` uint8 [H, W, 3] (x·0.5 + 0.5 clamped to [0, 1], × 255,
    truncated, as the authors' `decode_image`)."""

    def __init__(self, config: BagelConfig):
        super().__init__(config.vae)
        self.patch = config.latent_patch_size

    def forward(self, items: Items, ctx: StepContext | None = None) -> Items:
        out = []
        for item in items:
            latent = unpatchify(item["x_t"], tuple(item["latent_grid"]), self.patch)
            dtype = self.decoder.conv_in.weight.dtype
            pixels = self.decode(latent[None].to(dtype))[0].float()
            image = ((pixels * 0.5 + 0.5).clamp(0, 1) * 255).permute(1, 2, 0)
            out.append({"image": image.to(torch.uint8)})
        return out


def llm_node(config: BagelConfig, ctx: BuildContext) -> nn.Module:
    return BagelLLM(config.llm, latent_dim=config.latent_dim,
                    max_latent_size=config.max_latent_size, tp_rank=ctx.tp_rank,
                    tp_size=ctx.tp_size, tp_group=ctx.tp_group)


def weight_spec(node: str, config: BagelConfig) -> WeightSpec:
    """Each node's keys: the LLM's and the ViT's from `ema.safetensors`, the VAE halves'
    from `ae.safetensors`; the sampler nodes have no weights."""
    if node == "LLM":
        return WeightSpec(patterns=(EMA_FILE,), key_map=llm_key_map(config.llm))
    if node == "vit_encoder":
        return WeightSpec(patterns=(EMA_FILE,), key_map=(
            (r"((?:vit_model|connector|vit_pos_embed)\..*)", r"\1"), (r".*", None)))
    if node in ("vae_encoder", "vae_decoder"):
        return vae_weight_spec("encoder" if node == "vae_encoder" else "decoder")
    if node in ("latent_init", "combine_cfg"):
        return WeightSpec(patterns=(EMA_FILE,), key_map=((r".*", None),))
    raise ValueError(f"unknown bagel node {node!r}")
