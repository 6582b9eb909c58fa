"""BAGEL's image autoencoder: the FLUX.1 VAE (Black Forest Labs), pixels in [-1, 1] <->
`z_channels` latents at 1/`downsample` of the image's height and width (16 channels, 1/8).

Module names are the original `ae.safetensors` keys (`encoder.down.0.block.0.norm1.weight`,
`encoder.mid.attn_1.q.weight`, `decoder.up.3.upsample.conv.weight`, ...), so the real file
loads without renaming. The halves are separate node modules: `VAEEncoderNode` holds
`encoder.*`, `VAEDecoderNode` `decoder.*`, and `vae_weight_spec` of each ignores the other
half's keys. The original's empty per-level `attn` lists hold no weights and are left out.

Latent convention (the authors' `AutoEncoder`): the encoder's output is a diagonal Gaussian
(mean, log-variance); its draw is shifted and scaled, `(z - shift_factor) * scale_factor`,
into the space BAGEL's flow matching works in, and `decode` undoes that first. BAGEL's
inference *samples* the Gaussian (its `DiagonalGaussian` has `sample=True` and nothing turns
it off), so `encode` takes the standard normal noise as an argument (the runtime's keyed
`ctx.randn`, so a latent does not depend on batching); without noise it returns the mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mstar.weights import WeightSpec

#: The checkpoint file holding the VAE (BAGEL's other weights are in `ema.safetensors`).
AE_FILE = "ae.safetensors"
#: GroupNorm groups of every norm in the VAE (fixed by the architecture, not configured).
GROUPS = 32


@dataclass(frozen=True)
class AEConfig:
    """The FLUX.1 VAE's hyper-parameters; the defaults are the real checkpoint's (which ships
    no config of its own: the authors' `load_ae` hard-codes them). The authors' `resolution`
    field is omitted: it sizes nothing."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % GROUPS for w in widths):
            raise ValueError(f"every level's width ch * ch_mult must be a multiple of "
                             f"{GROUPS} (GroupNorm groups); got {widths}")

    @property
    def downsample(self) -> int:
        """Pixels per latent cell along each axis: one halving per level but the last."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls) -> AEConfig:
        """For CPU tests: downsample 4 (a 32×32 image is an 8×8 latent, 16 tokens at BAGEL's
        patch 2) and the real 16 latent channels, which the LLM side's `vae2llm` expects."""
        return cls(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two (norm, swish, 3×3 conv) steps plus the input, through a 1×1 conv (`nin_shortcut`)
    when the width changes."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over every spatial cell (1×1 convs as projections), plus
    the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.norm(x)

        def cells(conv: nn.Conv2d) -> torch.Tensor:  # [b, 1, h*w, c]
            return conv(normed).reshape(b, 1, c, h * w).transpose(2, 3)

        out = F.scaled_dot_product_attention(cells(self.q), cells(self.k), cells(self.v))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Halves height and width: zero-pad right and bottom by one, then a stride-2 3×3 conv
    (the asymmetric padding torch's conv cannot express)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Doubles height and width: nearest-neighbour, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution: `blocks` ResnetBlocks (the first changes the width), then a
    `downsample` or `upsample` resampler when given (checkpoint names `block.N`,
    `downsample.conv`, `upsample.conv`)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int,
                 resample: Literal["downsample", "upsample"] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_channels if i == 0 else out_channels,
                                               out_channels) for i in range(blocks))
        self.resample = resample
        if resample == "downsample":
            self.downsample = Downsample(out_channels)
        elif resample == "upsample":
            self.upsample = Upsample(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return x if self.resample is None else getattr(self, self.resample)(x)


class Mid(nn.Module):
    """The bottleneck: ResnetBlock, attention, ResnetBlock at constant width."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Pixels [B, in_channels, H, W] -> moments [B, 2·z_channels, H/d, W/d]: the mean's
    channels, then the log-variance's."""

    def __init__(self, config: AEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(config.ch if i == 0 else widths[i - 1], width, config.num_res_blocks,
                  "downsample" if i < last else None)
            for i, width in enumerate(widths))
        self.mid = Mid(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(pixels)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] (unscaled) -> pixels [B, out_ch, h·d, w·d]. `up[i]` is
    the level at the encoder's `down[i]` resolution, so it runs from the last to the first;
    each has one ResnetBlock more than the encoder's."""

    def __init__(self, config: AEConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1])
        self.up = nn.ModuleList(
            Level(widths[min(i + 1, last)], width, config.num_res_blocks + 1,
                  "upsample" if i > 0 else None)
            for i, width in enumerate(widths))
        self.norm_out = group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_image(x: torch.Tensor, channels: int, multiple: int, what: str) -> None:
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} must be [batch, {channels}, height, width]; got "
                         f"{list(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{what}'s height and width must be multiples of {multiple}; got "
                         f"{x.shape[2]}×{x.shape[3]}")


class VAEEncoderNode(nn.Module):
    """The `vae_encoder` node's module (checkpoint keys `encoder.*`): pixels -> BAGEL's
    scaled and shifted latents."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`pixels` [B, in_channels, H, W] in [-1, 1], H and W multiples of `downsample`
        -> latents [B, z_channels, H/d, W/d] in the flow's space. `noise` (standard normal,
        the latent's shape) draws the sample BAGEL conditions on: mean + std · noise; None
        gives the mean."""
        _check_image(pixels, self.config.in_channels, self.config.downsample, "pixels")
        mean, logvar = self.encoder(pixels).chunk(2, dim=1)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
        return (z - self.config.shift_factor) * self.config.scale_factor


class VAEDecoderNode(nn.Module):
    """The `vae_decoder` node's module (checkpoint keys `decoder.*`): BAGEL's latents ->
    pixels."""

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.decoder = Decoder(config)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, z_channels, h, w] in the flow's space -> pixels [B, out_ch, h·d, w·d],
        nominally in [-1, 1] (not clamped: BAGEL maps `x * 0.5 + 0.5` and clamps to [0, 1])."""
        _check_image(latents, self.config.z_channels, 1, "latents")
        return self.decoder(latents / self.config.scale_factor + self.config.shift_factor)


def vae_weight_spec(half: Literal["encoder", "decoder"]) -> WeightSpec:
    """The weights of `VAEEncoderNode` (`half="encoder"`) or `VAEDecoderNode`: the
    checkpoint's `ae.safetensors` under its own names, the other half's keys ignored."""
    if half not in ("encoder", "decoder"):
        raise ValueError(f"half must be 'encoder' or 'decoder', got {half!r}")
    other = "decoder" if half == "encoder" else "encoder"
    return WeightSpec(patterns=(AE_FILE,), format="safetensors",
                      key_map=((rf"{other}\..*", None),))
