"""Qwen3-Omni's audio encoder (AuT): log-mel frames -> Thinker-width embeddings, as
`transformers`' `Qwen3OmniMoeAudioEncoder` computes them.

Each clip's mel frames are cut into chunks of `2·n_window` frames (the last one shorter);
every chunk goes through three stride-2 conv2d layers (GELU) over (mel, time), `conv_out`
flattens channels × mel bins, and sinusoidal positions restart at 0 in every chunk. The rows
of the clip then attend in windows of `n_window_infer` frames' worth of rows (`get_audio_cu_
seqlens`), and `ln_post`, `proj1`, the activation and `proj2` give the output.

Batching is ragged (`ragged_attention`: one item per attention window, no padding between
clips). One deliberate difference: HF pads a batch's last chunks to the longest chunk of the
whole batch before the convolutions, and a padded column leaks into the last output row of
a short chunk (the first conv's bias makes the padding non-zero for the next conv). Here a
clip's chunks are padded as HF pads that clip alone (to its own longest chunk), so a clip's
embeddings do not depend on what it was batched with (the encoder cache keys on the clip).

Parameter names are the module's (`conv2d1..3`, `conv_out`, `layers.N.{self_attn.{q,k,v,
out}_proj, self_attn_layer_norm, fc1, fc2, final_layer_norm}`, `ln_post`, `proj1`, `proj2`);
the checkpoint holds them under `thinker.audio_tower.` (`audio_weight_spec`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar.model.forward import Segment, StepContext
from mstar.model.layers.mlp import ACTIVATIONS
from mstar.model.layers.vision import SiglipAttention
from mstar.model.ragged import ragged_attention
from mstar.weights import WeightSpec

CHECKPOINT_PREFIX = "thinker.audio_tower."


@dataclass(frozen=True)
class AudioEncoderConfig:
    """Fields of HF's `Qwen3OmniMoeAudioEncoderConfig` (its defaults, except `output_dim`:
    the Thinker's width, 2048 in Qwen3-Omni-30B-A3B)."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    activation_function: str = "gelu"
    n_window: int = 50
    n_window_infer: int = 800
    conv_chunksize: int = 500
    downsample_hidden_size: int = 480
    output_dim: int = 2048
    max_source_positions: int = 1500

    def __post_init__(self) -> None:
        if self.n_window_infer % (2 * self.n_window):
            raise ValueError(f"n_window_infer ({self.n_window_infer}) must be a multiple of "
                             f"2 * n_window ({2 * self.n_window})")
        if _conv_length(self.chunk_frames) > self.max_source_positions:
            raise ValueError(f"a chunk of {self.chunk_frames} frames needs "
                             f"{_conv_length(self.chunk_frames)} positions, the table has "
                             f"max_source_positions={self.max_source_positions}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation_function!r}; supported: "
                             f"{sorted(ACTIVATIONS)}")

    @property
    def chunk_frames(self) -> int:
        """Mel frames of one convolution chunk."""
        return 2 * self.n_window


def _conv_length(frames: int) -> int:
    """Rows three stride-2, padding-1, kernel-3 convolutions leave of `frames` columns."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def audio_output_length(num_frames: int, n_window: int = 50) -> int:
    """Embeddings a clip of `num_frames` mel frames becomes (HF's
    `_get_feat_extract_output_lengths`): the host expands the audio placeholder to this."""
    chunk = 2 * n_window
    return (num_frames // chunk) * _conv_length(chunk) + _conv_length(num_frames % chunk)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels] float32: [sin, cos] of t · max_timescale^(-k / (channels/2 - 1))
    (Whisper's table; HF keeps it as the non-checkpoint buffer `positional_embedding`)."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2).float())
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class AudioEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + fc2(act(fc1(ln(x))))."""

    def __init__(self, cfg: AudioEncoderConfig, layer_idx: int):
        super().__init__()
        dim = cfg.d_model
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.self_attn = SiglipAttention(dim, cfg.encoder_attention_heads, layer_idx)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, dim)
        self.act = ACTIVATIONS[cfg.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """Mel features of several clips -> one embedding matrix per clip, in one ragged pass."""

    def __init__(self, cfg: AudioEncoderConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, hidden, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(hidden, hidden, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(hidden, hidden, 3, 2, padding=1)
        mel_rows = (((cfg.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2
        self.conv_out = nn.Linear(hidden * mel_rows, cfg.d_model, bias=False)
        self.layers = nn.ModuleList(AudioEncoderLayer(cfg, i)
                                    for i in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(cfg.d_model)
        self.proj1 = nn.Linear(cfg.d_model, cfg.d_model)
        self.act = ACTIVATIONS[cfg.activation_function]
        self.proj2 = nn.Linear(cfg.d_model, cfg.output_dim)

    def output_length(self, num_frames: int) -> int:
        return audio_output_length(num_frames, self.cfg.n_window)

    def _downsample(self, chunks: torch.Tensor) -> torch.Tensor:
        """[N, mel, L] chunks of one padded length -> [N, conv rows, d_model] with the
        in-chunk sinusoidal positions added."""
        outs = []
        for part in chunks[:, None].split(self.cfg.conv_chunksize):
            x = F.gelu(self.conv2d1(part))
            x = F.gelu(self.conv2d2(x))
            outs.append(F.gelu(self.conv2d3(x)))
        x = torch.cat(outs)
        n, c, f, t = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(n, t, c * f))
        # HF's `embed_scale` (scale_embedding) is never applied in its forward; neither here.
        return x + sinusoids(t, self.cfg.d_model).to(x)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Clips' mel features [num_mel_bins, frames] -> [output_length(frames), output_dim]
        each."""
        for f in features:
            if f.dim() != 2 or f.shape[0] != self.cfg.num_mel_bins or f.shape[1] == 0:
                raise ValueError(f"audio features must be [{self.cfg.num_mel_bins}, frames > 0]"
                                 f", got {list(f.shape)}")
        dtype, size = self.conv2d1.weight.dtype, self.cfg.chunk_frames
        # Chunk k: (clip, first frame, frames). A clip's chunks are padded to its longest
        # chunk, as HF pads a clip alone; chunks of one padded length convolve together.
        chunks = [(i, start, min(size, f.shape[1] - start))
                  for i, f in enumerate(features) for start in range(0, f.shape[1], size)]
        by_length: dict[int, list[int]] = {}
        for k, (clip, _, _) in enumerate(chunks):
            by_length.setdefault(min(size, features[clip].shape[1]), []).append(k)
        rows: list[torch.Tensor | None] = [None] * len(chunks)
        for length, members in by_length.items():
            pieces = []
            for k in members:
                clip, start, n = chunks[k]
                pieces.append(F.pad(features[clip][:, start:start + n], (0, length - n)))
            out = self._downsample(torch.stack(pieces).to(dtype))
            for row, k in enumerate(members):
                rows[k] = out[row, :_conv_length(chunks[k][2])]
        x = torch.cat(rows)  # type: ignore[arg-type]
        # Attention windows: n_window_infer frames' worth of rows, cut clip by clip.
        lengths = [self.output_length(f.shape[1]) for f in features]
        window = _conv_length(size) * (self.cfg.n_window_infer // size)
        windows = [[Segment(min(window, n - start), "bidirectional")]
                   for n in lengths for start in range(0, n, window)]
        with ragged_attention(windows, device=x.device):
            for layer in self.layers:
                x = layer(x)
        x = self.proj2(self.act(self.proj1(self.ln_post(x))))
        return list(x.split(lengths))


class AudioEncoderNode(AudioEncoder):
    """The `audio_encoder` node: each item's `input_features` [num_mel_bins, frames] ->
    `audio_embeds` [audio_output_length(frames), output_dim]; every item in one pass."""

    def forward(self, items: list[dict[str, Any]],  # type: ignore[override]
                ctx: StepContext | None = None) -> list[dict[str, Any]]:
        if not items:
            return []
        embeds = super().forward([item["input_features"] for item in items])
        return [{"audio_embeds": e} for e in embeds]


def audio_weight_spec(source: str = "default") -> WeightSpec:
    """The encoder's tensors in the hub checkpoint (`thinker.audio_tower.*`); every other
    key of the checkpoint is ignored."""
    prefix = CHECKPOINT_PREFIX.replace(".", r"\.")
    return WeightSpec(source=source, key_map=((prefix + r"(.*)", r"\1"), (r".*", None)))


__all__ = ["AudioEncoder", "AudioEncoderConfig", "AudioEncoderNode", "audio_output_length",
           "audio_weight_spec"]
