"""Code2Wav: Qwen3-Omni's codec decoder, codec frames [F, 16] -> 24 kHz audio.

The frame's 16 codes index one shared table (group g's code c is row g·codebook_size + c)
and their embeddings are averaged; a small causal transformer with sliding-window attention
and layer scale runs over the frames; two transposed convolutions with ConvNeXt blocks
upsample by `prod(upsampling_ratios)`, then a causal convolutional decoder (transposed
convolutions and dilated residual units with SnakeBeta) by `prod(upsample_rates)`, and the
waveform is clamped to [-1, 1]. Module names are the hub's without the `code2wav.` prefix.

Every convolution is causal, but the decoder's transposed convolutions cut `rate` samples
off each side, so a window of F frames yields `F · total_upsample − short_by` samples:
the window's trailing samples are missing (555 at the real rates). HF's `chunked_decode`
keeps each window's output after its left context, shortfall included, and so do we: the
runtime cuts a window's output with `slice_emitted(..., rows_per_unit=total_upsample)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.layers import RMSNorm, RotaryEmbedding
from mstar.weights import WeightSpec


@dataclass(frozen=True)
class Code2WavConfig:
    """`Qwen3OmniMoeCode2WavConfig`'s fields (defaults: the real model's)."""

    codebook_size: int = 2048
    hidden_size: int = 1024
    max_position_embeddings: int = 8000
    rope_parameters: dict[str, Any] | None = None
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    attention_bias: bool = False
    sliding_window: int = 72
    intermediate_size: int = 3072
    hidden_act: str = "silu"
    layer_scale_initial_scale: float = 0.01
    rms_norm_eps: float = 1e-5
    num_hidden_layers: int = 8
    num_quantizers: int = 16
    upsample_rates: tuple[int, ...] = field(default=(8, 5, 4, 3))
    upsampling_ratios: tuple[int, ...] = field(default=(2, 2))
    decoder_dim: int = 1536

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @property
    def total_upsample(self) -> int:
        """Audio samples per codec frame."""
        return math.prod(self.upsample_rates) * math.prod(self.upsampling_ratios)

    @property
    def short_by(self) -> int:
        """Samples a window's output lacks at its end: each decoder block's transposed
        convolution drops `rate` samples at its rate, later blocks upsample the gap."""
        short = 0
        for rate in self.upsample_rates:
            short = short * rate + rate
        return short


class CausalConv(nn.Module):
    """Conv1d padded on the left by its receptive field less the stride, and on the right
    just enough that the last frame is complete (HF's `Qwen3OmniMoeCausalConvNet`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 dilation: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride,
                              dilation=dilation, groups=groups)
        self.stride = stride
        self.span = (kernel_size - 1) * dilation + 1
        self.left = self.span - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        frames = math.ceil((length - self.span + self.left) / self.stride + 1)
        right = (frames - 1) * self.stride + self.span - self.left - length
        return self.conv(F.pad(x, (self.left, right)))


class CausalTransConv(nn.Module):
    """ConvTranspose1d with `kernel − stride` samples cut off each end."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.trim = kernel_size - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.trim:y.shape[-1] - self.trim]


class ConvNeXtBlock(nn.Module):
    """Depthwise causal conv k7, LayerNorm, pointwise MLP (×4, GELU), scaled by `gamma`,
    plus the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = CausalConv(dim, dim, 7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)


class SnakeBeta(nn.Module):
    """x + sin²(x·e^α) / e^β per channel (α, β stored as logs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.exp()[None, :, None]
        beta = self.beta.exp()[None, :, None]
        return x + (beta + 1e-9).reciprocal() * torch.sin(x * alpha).pow(2)


class ResidualUnit(nn.Module):
    """SnakeBeta, dilated causal conv k7, SnakeBeta, conv k1, plus the input."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class DecoderBlock(nn.Module):
    """SnakeBeta, transposed conv upsampling by `rate` (halving the channels), three
    residual units (dilations 1, 3, 9)."""

    def __init__(self, in_dim: int, rate: int):
        super().__init__()
        out_dim = in_dim // 2
        self.block = nn.ModuleList([SnakeBeta(in_dim), CausalTransConv(in_dim, out_dim,
                                                                       2 * rate, rate),
                                    *(ResidualUnit(out_dim, d) for d in (1, 3, 9))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.block:
            x = layer(x)
        return x


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class _Attention(nn.Module):
    """Causal attention over the frames of each window, each frame seeing itself and the
    `sliding_window − 1` frames before it. Windows are dense [B, F] (equal F per batch)."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        d, bias = cfg.head_dim, cfg.attention_bias
        self.heads, self.kv_heads, self.head_dim = (cfg.num_attention_heads,
                                                    cfg.num_key_value_heads, d)
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.heads * d, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim)
        q, k = RotaryEmbedding.apply(q, k, cos_sin)
        i = torch.arange(n, device=x.device)
        mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), attn_mask=mask,
                                           enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class _GatedMLP(nn.Module):
    """down(silu(gate(x)) · up(x)) on dense [B, F, H] rows (no tensor parallelism)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _TransformerLayer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = _Attention(cfg)
        self.mlp = _GatedMLP(h, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(h)
        self.mlp_layer_scale = LayerScale(h)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        x = x + self.self_attn_layer_scale(self.self_attn(self.input_layernorm(x), cos_sin))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class _PreTransformer(nn.Module):
    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.layers = nn.ModuleList(_TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos_sin = self.rotary.cos_sin(torch.arange(x.shape[1], device=x.device))
        for layer in self.layers:
            x = layer(x, cos_sin)
        return self.norm(x)


class Code2Wav(nn.Module):
    """`decode(codes [B, 16, F])` -> audio [B, F · total_upsample − short_by] in [-1, 1]
    (`Qwen3OmniMoeCode2Wav.forward`, each window from frame position 0)."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        self.code_embedding = nn.Embedding(cfg.codebook_size * cfg.num_quantizers, h)
        self.pre_transformer = _PreTransformer(cfg)
        self.upsample = nn.ModuleList(
            nn.ModuleList([CausalTransConv(h, h, f, f), ConvNeXtBlock(h)])
            for f in cfg.upsampling_ratios)
        dim = cfg.decoder_dim
        out_dim = dim // 2 ** len(cfg.upsample_rates)
        self.decoder = nn.ModuleList([
            CausalConv(h, dim, 7),
            *(DecoderBlock(dim // 2**i, rate) for i, rate in enumerate(cfg.upsample_rates)),
            SnakeBeta(out_dim),
            CausalConv(out_dim, 1, 7)])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if codes.dim() != 3 or codes.shape[1] != cfg.num_quantizers:
            raise ValueError(f"Code2Wav takes codes [B, {cfg.num_quantizers}, F], got "
                             f"{list(codes.shape)}")
        offset = torch.arange(cfg.num_quantizers, device=codes.device)[None, :, None]
        x = self.code_embedding(codes + offset * cfg.codebook_size).mean(1)
        x = self.pre_transformer(x).transpose(1, 2)
        for blocks in self.upsample:
            for block in blocks:
                x = block(x)
        for block in self.decoder:
            x = block(x)
        return x[:, 0].clamp(-1, 1)


class Code2WavNode(nn.Module):
    """The stateless `Code2Wav` node: each item's window of frames `codes` [F, 16] ->
    `{"audio": [F · total_upsample − short_by]}` (float32). Windows of equal F decode in
    one batch; an empty window gives no samples."""

    def __init__(self, cfg: Code2WavConfig):
        super().__init__()
        self.code2wav = Code2Wav(cfg)
        #: Audio samples per codec frame, for `slice_emitted(rows_per_unit=)`.
        self.rows_per_unit = {"audio": cfg.total_upsample}

    def forward(self, items: list[dict[str, Any]], ctx: Any = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"audio": torch.zeros(0)} for _ in items]
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            if item["codes"].shape[0]:
                groups.setdefault(item["codes"].shape[0], []).append(i)
        for indices in groups.values():
            codes = torch.stack([items[i]["codes"].long() for i in indices]).transpose(1, 2)
            audio = self.code2wav.decode(codes).float()
            for row, i in enumerate(indices):
                out[i] = {"audio": audio[row]}
        return out


def audible_value(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A random value for Code2Wav parameter `name` under which a random decoder is
    audible: every block shapes the waveform (layer scales and ConvNeXt gains away from
    their near-zero initial values, weights scaled by their fan-in) and the last
    convolution, to one channel, keeps it mostly inside the final clamp."""
    if name.endswith(("scale", "gamma")):
        return 0.3 + 0.4 * torch.rand(shape, generator=generator)
    if name.endswith(("alpha", "beta")):
        return 0.3 * torch.randn(shape, generator=generator)
    if "norm" in name and name.endswith("weight"):
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    fan_in = shape[1:].numel() if len(shape) > 1 else 16
    gain = 0.02 if shape[0] == 1 else 1.0
    return gain * torch.randn(shape, generator=generator) / fan_in**0.5


def code2wav_weight_spec() -> WeightSpec:
    """The hub's `code2wav.*` keys are `Code2WavNode`'s names; every other key is another
    node's."""
    return WeightSpec(key_map=((r"(code2wav\..*)", r"\1"), (r".*", None)))
