"""The SNAC codec's decode path (codes -> 24 kHz audio), loading the hub checkpoint as is.

Orpheus only ever decodes, so this holds the quantizer's `from_codes` half (codebooks and
output projections, no input projections) and the decoder; the encoder's keys are ignored
on load. Module names mirror `snac.SNAC`'s (`quantizer.quantizers.N.…`, `decoder.model.N.…`,
indices included), so one config-free `WeightSpec` maps any SNAC checkpoint. The hub's
`pytorch_model.bin` stores weight norm in PyTorch's parametrization layout
(`<conv>.parametrizations.weight.original0` = g, `original1` = v); our convolutions keep g
and v as `weight_g`/`weight_v` (the legacy `torch.nn.utils.weight_norm` names, so such
checkpoints load too) and fold them on every call, as the package does.

The decoder's NoiseBlocks add Gaussian noise. `decode(codes, noise)` takes it from `noise`
(called once per NoiseBlock, in decoder order, with the shape `(B, 1, T)` it needs), so the
runtime can key it per request; without `noise` it draws `torch.randn` in the package's
order, which makes outputs equal to the package's under the same global seed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mstar.weights import WeightSpec
from mstar_orpheus.config import SnacConfig

Noise = Callable[[tuple[int, ...]], torch.Tensor]


def _weight_norm(weight_v: torch.Tensor, weight_g: torch.Tensor) -> torch.Tensor:
    """w = g * v / ||v||, the norm over every dim but 0 (weight_norm's default `dim=0`)."""
    return weight_v * (weight_g / weight_v.norm(dim=tuple(range(1, weight_v.dim())),
                                                keepdim=True))


class WNConv1d(nn.Module):
    """A weight-normalised Conv1d (SNAC's `WNConv1d`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        self.padding, self.dilation, self.groups = padding, dilation, groups
        self.weight_g = nn.Parameter(torch.empty(out_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels // groups,
                                                 kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _weight_norm(self.weight_v, self.weight_g)
        return F.conv1d(x, weight, self.bias, padding=self.padding, dilation=self.dilation,
                        groups=self.groups)


class WNConvTranspose1d(nn.Module):
    """A weight-normalised ConvTranspose1d upsampling by `stride` (SNAC's decoder block).
    Its weight is laid out [in, out, kernel], so g has one entry per *input* channel."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.padding = math.ceil(stride / 2)
        self.output_padding = stride % 2
        self.weight_g = nn.Parameter(torch.empty(in_channels, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(in_channels, out_channels, 2 * stride))
        self.bias = nn.Parameter(torch.empty(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _weight_norm(self.weight_v, self.weight_g)
        return F.conv_transpose1d(x, weight, self.bias, stride=self.stride,
                                  padding=self.padding, output_padding=self.output_padding)


class Snake1d(nn.Module):
    """x + sin²(αx)/α per channel: a periodic activation suited to waveforms."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    """Snake, dilated (depthwise) conv k7, Snake, conv k1, plus the input. The padding keeps
    the length, so the package's crop of the skip path never applies."""

    def __init__(self, dim: int, dilation: int, groups: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation, groups=groups),
            Snake1d(dim),
            WNConv1d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class NoiseBlock(nn.Module):
    """x + n * linear(x), n ~ N(0, 1) of shape (B, 1, T): one noise value per time step,
    scaled per channel by a projection of the signal."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = WNConv1d(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, noise: Noise | None) -> torch.Tensor:
        shape = (x.shape[0], 1, x.shape[2])
        n = (torch.randn(shape, device=x.device, dtype=x.dtype) if noise is None
             else noise(shape).to(device=x.device, dtype=x.dtype))
        return x + n * self.linear(x)


class DecoderBlock(nn.Module):
    """Snake, transposed conv upsampling by `stride`, optional noise, three residual units
    (dilations 1, 3, 9)."""

    def __init__(self, input_dim: int, output_dim: int, stride: int, noise: bool,
                 groups: int):
        super().__init__()
        layers: list[nn.Module] = [Snake1d(input_dim),
                                   WNConvTranspose1d(input_dim, output_dim, stride)]
        if noise:
            layers.append(NoiseBlock(output_dim))
        layers += [ResidualUnit(output_dim, d, groups) for d in (1, 3, 9)]
        self.block = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, noise: Noise | None) -> torch.Tensor:
        for layer in self.block:
            x = layer(x, noise) if isinstance(layer, NoiseBlock) else layer(x)
        return x


class Decoder(nn.Module):
    """Latent (B, latent_dim, T) -> audio (B, 1, T * prod(rates)) in [-1, 1]."""

    def __init__(self, config: SnacConfig, latent_dim: int):
        super().__init__()
        channels = config.decoder_dim
        if config.depthwise:
            layers: list[nn.Module] = [
                WNConv1d(latent_dim, latent_dim, 7, padding=3, groups=latent_dim),
                WNConv1d(latent_dim, channels, 1)]
        else:
            layers = [WNConv1d(latent_dim, channels, 7, padding=3)]
        for i, stride in enumerate(config.decoder_rates):
            input_dim, output_dim = channels // 2**i, channels // 2 ** (i + 1)
            layers.append(DecoderBlock(input_dim, output_dim, stride, config.noise,
                                       groups=output_dim if config.depthwise else 1))
        layers += [Snake1d(output_dim), WNConv1d(output_dim, 1, 7, padding=3), nn.Tanh()]
        self.model = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, noise: Noise | None) -> torch.Tensor:
        for layer in self.model:
            x = layer(x, noise) if isinstance(layer, DecoderBlock) else layer(x)
        return x


class CodeLevel(nn.Module):
    """One residual-VQ level's decode half: codebook lookup and projection to the latent."""

    def __init__(self, config: SnacConfig, latent_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)
        self.out_proj = WNConv1d(config.codebook_dim, latent_dim, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        z = self.out_proj(self.codebook(codes).transpose(1, 2))
        return z.repeat_interleave(self.stride, dim=-1)


class Quantizer(nn.Module):
    """Codes of every level -> the summed latent. Level l has one code per `vq_strides[l]`
    latent steps, so each is repeated that many times before summing."""

    def __init__(self, config: SnacConfig, latent_dim: int):
        super().__init__()
        self.quantizers = nn.ModuleList(
            [CodeLevel(config, latent_dim, stride) for stride in config.vq_strides])

    def forward(self, codes: list[torch.Tensor]) -> torch.Tensor:
        z = self.quantizers[0](codes[0])
        for level, c in zip(self.quantizers[1:], codes[1:]):
            z = z + level(c)
        return z


class SnacDecoder(nn.Module):
    """SNAC codes -> audio. One call decodes a batch of windows of the same length."""

    def __init__(self, config: SnacConfig):
        super().__init__()
        if config.attn_window_size is not None:
            raise ValueError(
                f"SNAC with local attention (attn_window_size={config.attn_window_size}) is "
                "not supported: only the attention-free decoder of snac_24khz is implemented")
        latent_dim = config.latent_dim or config.encoder_dim * 2 ** len(config.encoder_rates)
        self.vq_strides = tuple(config.vq_strides)
        #: Audio samples per latent step (the decoder's total upsampling).
        self.hop_length = math.prod(config.decoder_rates)
        self.quantizer = Quantizer(config, latent_dim)
        self.decoder = Decoder(config, latent_dim)

    def decode(self, codes: list[torch.Tensor], noise: Noise | None = None) -> torch.Tensor:
        """`codes[l]`: int64 [B, T_l] with T_l * vq_strides[l] equal for every level (24 kHz:
        [B, T0], [B, 2*T0], [B, 4*T0]). Returns audio [B, 1, T_0 * vq_strides[0] * hop]
        (2048 samples per level-0 code at 24 kHz). `noise(shape)` supplies each NoiseBlock's
        N(0, 1) noise; None draws `torch.randn` as the package does."""
        if len(codes) != len(self.vq_strides):
            raise ValueError(f"SNAC takes {len(self.vq_strides)} code levels, got {len(codes)}")
        steps = {c.shape[-1] * s for c, s in zip(codes, self.vq_strides)}
        batches = {c.shape[0] for c in codes}
        if len(steps) != 1 or len(batches) != 1 or any(c.dim() != 2 for c in codes):
            raise ValueError(
                f"SNAC codes must be [B, T_l] with T_l * stride equal across levels "
                f"(strides {list(self.vq_strides)}); got shapes "
                f"{[list(c.shape) for c in codes]}")
        return self.decoder(self.quantizer(codes), noise)


def snac_weight_spec() -> WeightSpec:
    """The codec node's weights: the hub's `pytorch_model.bin` (a torch pickle). Weight-norm
    parametrizations become `weight_g`/`weight_v`; the encoder and the quantizer's input
    projections (encode-only) are ignored."""
    return WeightSpec(
        source="snac",
        patterns=("pytorch_model.bin",),
        format="torch",
        key_map=(
            (r"encoder\..*", None),
            (r"quantizer\.quantizers\.\d+\.in_proj\..*", None),
            (r"(.*)\.parametrizations\.weight\.original0", r"\1.weight_g"),
            (r"(.*)\.parametrizations\.weight\.original1", r"\1.weight_v"),
        ),
    )


def audible_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A random value for SNAC parameter `name` (the package's names or ours) under which a
    random codec is audible: the gains (g) make the output depend on the codes while its
    tanh stays mostly unsaturated (larger ones saturate it, smaller ones, such as generic
    dummy weights, leave only the biases' near-silent output)."""
    if name.endswith("alpha"):
        return 0.5 + torch.rand(shape, generator=generator)
    if name.endswith(("original0", "weight_g")):
        return 0.5 + 0.4 * torch.rand(shape, generator=generator)
    if name.endswith("bias"):
        return 0.01 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator)  # v and codebooks


def write_tiny_snac(directory: Path, config: SnacConfig, seed: int = 0) -> None:
    """Write a checkpoint of the reference `snac.SNAC(**config)` in the hub's layout
    (`pytorch_model.bin` + `config.json`) with seeded random weights (`audible_value`).
    Every parameter is drawn (codebooks, g and v, biases, Snake's α), so no default init
    hides a mistake. Needs the `snac` package (`pip install 'mstar-orpheus[checkpoint]'`)."""
    try:
        import snac  # the reference, for the hub's keys; not a runtime dependency
    except ImportError as err:
        raise ImportError("writing a SNAC checkpoint needs the snac package: "
                          "pip install 'mstar-orpheus[checkpoint]'") from err

    model = snac.SNAC(**asdict(config))
    gen = torch.Generator().manual_seed(seed)
    model.load_state_dict({name: audible_value(name, value.shape, gen).to(value.dtype)
                           for name, value in model.state_dict().items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
